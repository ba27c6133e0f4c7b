"""The only module that imports bcc: compile the C in xdp/, load, attach,
detach, and reach the maps. bcc raises bare Exception; everything leaves
this module as BpfError. Map key/value types are bcc's Key/Leaf types, derived
from xdp/structs.h: no struct layout is copied into Python."""
from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import subprocess
from pathlib import Path

from . import consts, libbpf, netlink
from .consts import Capacity
from .errors import BpfError

log = logging.getLogger("l4lb.bpf")

XDP_DIR = Path(__file__).resolve().parent.parent / "xdp"
BPFFS = "/sys/fs/bpf"

def _bcc():
    try:
        import bcc  # noqa: PLC0415
    except ImportError as e:
        raise BpfError("bcc is not importable: install Debian's python3-bpfcc and use a venv "
                       "made with --system-site-packages (run `make setup`)") from e
    return bcc


def ensure_bpffs() -> None:
    """Mounts the BPF filesystem at /sys/fs/bpf if it is not mounted."""
    with open("/proc/mounts") as f:
        if any(line.split()[1] == BPFFS and line.split()[2] == "bpf" for line in f):
            return
    r = subprocess.run(["mount", "-t", "bpf", "bpf", BPFFS], capture_output=True, text=True)
    if r.returncode:
        raise BpfError(f"cannot mount bpffs on {BPFFS}: {r.stderr.strip()}")


@contextlib.contextmanager
def _quiet_stderr():
    """bcc prints compiler warnings and verifier logs on fd 2; keep them for errors."""
    saved = os.dup(2)
    with open(os.devnull, "w") if False else _TempFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield tmp
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class _TempFile(io.FileIO):
    def __init__(self):
        import tempfile  # noqa: PLC0415

        fd, self._path = tempfile.mkstemp(prefix="l4lb-bcc-")
        super().__init__(fd, "w+")

    def text(self) -> str:
        self.flush()
        with open(self._path, errors="replace") as f:
            return f.read()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        with contextlib.suppress(OSError):
            os.unlink(self._path)


def compile_program(source: str, cflags: list[str], fn_names: list[str], src_dir: Path = XDP_DIR):
    """Compiles <src_dir>/<source> (xdp/ by default) and loads the named XDP
    functions. Returns (bpf, {name: fn})."""
    bcc = _bcc()
    with _quiet_stderr() as err:
        try:
            b = bcc.BPF(src_file=str(src_dir / source).encode(), cflags=cflags + [f"-I{XDP_DIR}"])
            fns = {n: b.load_func(n.encode(), bcc.BPF.XDP) for n in fn_names}
        except Exception as e:  # bcc raises bare Exception
            detail = err.text().strip().splitlines()
            tail = "\n".join(detail[-30:])
            raise BpfError(f"compiling or loading {src_dir.name}/{source} failed: {e}\n{tail}") from e
    return b, fns


class Program:
    """A compiled and loaded XDP program with its maps."""

    def __init__(self, bpf, fn, name: str):
        self.bpf = bpf
        self.fn = fn
        self.name = name
        self.ifname: str | None = None
        self.attach_mode: str | None = None

    @property
    def fd(self) -> int:
        return self.fn.fd

    def fdinfo(self) -> dict[str, str]:
        """The kernel's view of this program (prog_id, prog_tag, ...)."""
        out = {}
        with open(f"/proc/self/fdinfo/{self.fd}") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k.strip()] = v.strip()
        return out

    def table(self, name: str):
        try:
            return self.bpf.get_table(name.encode())
        except Exception as e:
            raise BpfError(f"map {name!r} not found in program {self.name}: {e}") from e

    def run(self, packet: bytes, repeat: int = 1) -> libbpf.RunResult:
        return libbpf.run(self.fd, packet, repeat=repeat)

    def attach(self, ifname: str, mode: str = "auto", replace_id: int | None = None) -> str:
        """Attaches natively ('native'), in generic mode ('generic') or natively
        with a fallback to generic ('auto'). With replace_id the running
        program is swapped atomically (XDP_FLAGS_REPLACE). Returns the mode."""
        if mode not in ("auto", "native", "generic"):
            raise BpfError(f"attach mode {mode!r}: use auto, native or generic")
        tries = ["native", "generic"] if mode == "auto" else [mode]
        last = None
        for name in tries:
            try:
                libbpf.xdp_attach(netlink.ifindex(ifname), self.fd, name, replace_id)
            except BpfError as e:
                last = e
                continue
            if mode == "auto" and name == "generic":
                log.warning("native XDP is not available on %s (%s); attached in generic mode, "
                            "which is much slower", ifname, last)
            self.ifname, self.attach_mode = ifname, name
            return name
        raise BpfError(f"cannot attach {self.name} to {ifname}: {last}")

    def detach(self) -> None:
        if not self.ifname:
            return
        libbpf.xdp_detach(netlink.ifindex(self.ifname), self.attach_mode)
        self.ifname = self.attach_mode = None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.bpf.cleanup()


def remove_pins(pin_dir: str) -> None:
    """Removes a program's pinned maps, and their parent when nothing else is pinned there."""
    import shutil  # noqa: PLC0415

    shutil.rmtree(pin_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(os.path.normpath(pin_dir)))  # only if empty


def load_balancer(capacity: Capacity = Capacity(), pin_dir: str | None = None) -> Program:
    flags = consts.cflags(capacity)
    if pin_dir:
        ensure_bpffs()
        os.makedirs(pin_dir, exist_ok=True)
        flags.append(f'-DPIN_DIR="{pin_dir}"')
    b, fns = compile_program("balancer.c", flags, [consts.PROG_BALANCER])
    return Program(b, fns[consts.PROG_BALANCER], consts.PROG_BALANCER)


def load_decap() -> Program:
    b, fns = compile_program("decap.c", consts.cflags(Capacity(max_vips=1, ct_size=1, ring_size=3)),
                             [consts.PROG_DECAP])
    return Program(b, fns[consts.PROG_DECAP], consts.PROG_DECAP)


def percpu_sum(table, key_index: int = 0) -> dict[str, int]:
    """Sums a per-CPU struct of u64 counters over CPUs: {field: total}."""
    values = table[table.Key(key_index)]
    leaf_t = getattr(table, "sLeaf", table.Leaf)  # bcc: per-CPU tables keep the struct here
    fields = [f for f, _ in leaf_t._fields_ if not f.startswith("pad")]
    return {f: sum(getattr(v, f) for v in values) for f in fields}


def leaf_from_bytes(table, raw: bytes):
    leaf_t = table.Leaf
    if len(raw) != ctypes.sizeof(leaf_t):
        raise BpfError(f"value for map {table.name!r}: {len(raw)} bytes, layout has {ctypes.sizeof(leaf_t)}")
    return leaf_t.from_buffer_copy(raw)


BALANCER_MAPS = (consts.MAP_VIPS, consts.MAP_VIP_ADDRS, consts.MAP_RINGS, consts.MAP_BACKENDS,
                 consts.MAP_CONNTRACK, consts.MAP_CONNTRACK6, consts.MAP_CONFIG, consts.MAP_VIP_STATS, consts.MAP_GLOBAL_STATS,
                 consts.MAP_CPU_STATE)


def source_hash(capacity: Capacity) -> str:
    """Fingerprint of the C sources and the constants they are compiled with."""
    import hashlib  # noqa: PLC0415

    h = hashlib.sha256(" ".join(consts.cflags(capacity)).encode())
    for f in sorted(XDP_DIR.glob("*.[ch]")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def layout_of(prog: Program) -> dict[str, tuple[int, int, int]]:
    """(key size, value size, max entries) of each map, from the compiled program."""
    out = {}
    for name in BALANCER_MAPS:
        t = prog.table(name)
        leaf = getattr(t, "sLeaf", t.Leaf)
        out[name] = (ctypes.sizeof(t.Key), ctypes.sizeof(leaf), t.max_entries)
    return out


def maps_memory(pin_dir: str) -> int:
    """Kernel memory charged for the pinned maps (bpftool's bytes_memlock)."""
    import json  # noqa: PLC0415

    total = 0
    for name in BALANCER_MAPS:
        path = os.path.join(pin_dir, name)
        r = subprocess.run(["bpftool", "-j", "map", "show", "pinned", path], capture_output=True, text=True)
        if r.returncode == 0:
            total += int(json.loads(r.stdout).get("bytes_memlock", 0))
    return total


def pinned_layout(pin_dir: str) -> dict[str, tuple[int, int, int]]:
    """The same for maps pinned in pin_dir (what the running program uses)."""
    import json  # noqa: PLC0415

    out = {}
    for name in BALANCER_MAPS:
        path = os.path.join(pin_dir, name)
        if not os.path.exists(path):
            continue
        r = subprocess.run(["bpftool", "-j", "map", "show", "pinned", path], capture_output=True, text=True)
        if r.returncode:
            raise BpfError(f"cannot inspect pinned map {path}: {r.stderr.strip()}")
        m = json.loads(r.stdout)
        out[name] = (m["bytes_key"], m["bytes_value"], m["max_entries"])
    return out
