"""The layout's rules, read from the code itself (docs/architecture.md):
imports only point down, bcc and libbpf each have one door, the CLI lists
its verbs in one place."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("l4lb", "control", "bench", "docker", "tests", "scripts", "deploy")


def python_files(*dirs):
    for d in dirs:
        for f in sorted((ROOT / d).rglob("*.py")):
            if "_pb2" not in f.name:
                yield f


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module a file imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def runtime_files():
    return [f for f in python_files("l4lb") if "testbed" not in f.relative_to(ROOT / "l4lb").parts]


@pytest.mark.parametrize("path", runtime_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_runtime_imports_neither_control_nor_bench_nor_the_testbed(path):
    bad = sorted(m for m in imported_modules(path)
                 if m.split(".")[0] in ("control", "bench") or m.startswith("l4lb.testbed"))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: the runtime may only import the runtime"


def test_the_testbed_does_not_import_control_or_bench():
    files = list(python_files("l4lb/testbed")) if (ROOT / "l4lb/testbed").is_dir() else []
    for path in files:
        bad = sorted(m for m in imported_modules(path) if m.split(".")[0] in ("control", "bench"))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}: the caller injects the control plane"


def test_control_never_imports_bench():
    for path in python_files("control"):
        bad = sorted(m for m in imported_modules(path) if m.split(".")[0] == "bench")
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_bcc_is_imported_by_l4lb_bpf_alone():
    importers = sorted(str(p.relative_to(ROOT)) for p in python_files(*SOURCE_DIRS)
                       if any(m == "bcc" or m.startswith("bcc.") for m in imported_modules(p)))
    assert importers == ["l4lb/bpf.py"]


def test_libbpf_is_loaded_by_l4lb_libbpf_alone():
    """Nobody else opens the library, or reaches into the module's privates."""
    for path in python_files(*SOURCE_DIRS):
        if path == ROOT / "l4lb/libbpf.py" or path == Path(__file__).resolve():
            continue
        text = path.read_text()
        assert "libbpf._" not in text, f"{path.relative_to(ROOT)} reaches into l4lb.libbpf's privates"
        assert 'find_library("bpf")' not in text and "libbpf.so" not in text, \
            f"{path.relative_to(ROOT)} loads libbpf itself"


def test_no_module_reaches_into_another_modules_privates():
    """`obj._name` across modules: only within the module that defines it."""
    found = []
    for path in python_files("l4lb", "control"):
        tree = ast.parse(path.read_text())
        own = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.endswith("_"):
                base = node.value
                if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                    continue
                if node.attr in own:
                    continue
                if isinstance(base, ast.Name) and base.id in ("sys", "os", "ctypes"):
                    continue  # the standard library's documented underscores (sys._getframe, os._exit)
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
    assert not found, "private names reached from outside their module: " + ", ".join(found)


def test_one_table_lists_every_cli_verb():
    from control.commands import build_parser, verbs_table

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "cmd")
    assert list(sub.choices) == [name for name, _ in verbs_table()]
