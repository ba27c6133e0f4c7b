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
from dataclasses import dataclass
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


def bcc_version() -> str:
    """The version of the bcc in use ("" when it cannot be imported)."""
    try:
        return getattr(_bcc(), "__version__", "")
    except BpfError:
        return ""


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


def compile_program(source: str, cflags: list[str], fn_names: list[str], src_dir: Path = XDP_DIR,
                    kind: str = "xdp"):
    """Compiles <src_dir>/<source> (xdp/ by default) and loads the named
    functions as XDP programs, or as tc classifiers (kind "sched_cls").
    Returns (bpf, {name: fn})."""
    bcc = _bcc()
    prog_type = {"xdp": bcc.BPF.XDP, "sched_cls": bcc.BPF.SCHED_CLS}[kind]
    with _quiet_stderr() as err:
        try:
            b = bcc.BPF(src_file=str(src_dir / source).encode(), cflags=cflags + [f"-I{XDP_DIR}"])
            fns = {n: b.load_func(n.encode(), prog_type) for n in fn_names}
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
        self.attached: dict[str, str] = {}  # every interface it is attached to -> mode

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
            self.attached[ifname] = name
            return name
        raise BpfError(f"cannot attach {self.name} to {ifname}: {last}")

    def detach(self) -> None:
        """Detaches from every interface it was attached to (or adopted on)."""
        if self.ifname and self.ifname not in self.attached:
            self.attached[self.ifname] = self.attach_mode
        for ifname, mode in list(self.attached.items()):
            libbpf.xdp_detach(netlink.ifindex(ifname), mode)
            del self.attached[ifname]
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


class TcProgram(Program):
    """A loaded tc classifier (direct action), attached to an interface's
    clsact egress hook by attach_egress and removed, with the clsact qdisc if
    it added it, by detach."""

    def __init__(self, bpf, fn, name: str):
        super().__init__(bpf, fn, name)
        self.added_qdisc = False

    def run(self, packet: bytes, repeat: int = 1, mark: int = 0) -> libbpf.RunResult:
        return libbpf.run_skb(self.fd, packet, mark=mark, repeat=repeat)

    def attach(self, ifname: str, mode: str = "auto", replace_id: int | None = None) -> str:
        raise BpfError(f"{self.name} is a tc program: use attach_egress")

    def attach_egress(self, ifname: str, replace: bool = False) -> None:
        """replace: take the place of the probe filter an earlier process left
        (l4lb run leaves it, like the XDP program, when it stops)."""
        self.added_qdisc = netlink.tc_attach_egress(ifname, self.fd, self.name, replace=replace)
        self.ifname, self.attach_mode = ifname, "tc-egress"

    def detach(self, remove_qdisc: bool | None = None) -> None:
        """remove_qdisc: also the clsact qdisc when no other filter uses it
        (default: only if attach_egress added it)."""
        if not self.ifname:
            return
        netlink.tc_detach_egress(self.ifname, remove_qdisc=self.added_qdisc if remove_qdisc is None else remove_qdisc)
        self.ifname = self.attach_mode = None
        self.added_qdisc = False


def load_probe_encap(capacity: Capacity, pin_dir: str) -> TcProgram:
    """Compiles the probes' tc egress program (xdp/probe_encap.c) against the
    balancer's pinned maps in pin_dir, which must exist (the balancer loaded
    with the same capacity): it reads the backends and the configuration
    the balancer uses, and never creates them."""
    need = [m for m in consts.maps_of(consts.PROG_PROBE) if m.pinned]
    missing = [m.name for m in need if not os.path.exists(os.path.join(pin_dir, m.name))]
    if missing:
        raise BpfError(f"pinned maps {', '.join(missing)} are missing in {pin_dir}: the probe program "
                       "shares the balancer's; start `l4lb run` on the interface first")
    b, fns = compile_program("probe_encap.c", consts.cflags(capacity) + [f'-DPIN_DIR="{pin_dir}"'],
                             [consts.PROG_PROBE], kind="sched_cls")
    prog = TcProgram(b, fns[consts.PROG_PROBE], consts.PROG_PROBE)
    have = pinned_layout(pin_dir)
    new = layout_of(prog)
    wrong = [f"{m.name}: pinned ({have[m.name]}), probe program ({new[m.name]})"
             for m in need if have.get(m.name) != new[m.name]]
    if wrong:
        prog.close()
        raise BpfError("the probe program and the pinned balancer maps differ (another capacity?): "
                       + "; ".join(wrong))
    return prog


def percpu_sum(table, key_index: int = 0) -> dict[str, int]:
    """Sums a per-CPU struct of u64 counters over CPUs: {field: total}."""
    values = table[table.Key(key_index)]
    leaf_t = getattr(table, "sLeaf", table.Leaf)  # bcc: per-CPU tables keep the struct here
    fields = [f for f, _ in leaf_t._fields_ if not f.startswith("pad")]
    return {f: sum(getattr(v, f) for v in values) for f in fields}


def possible_cpus() -> int:
    return len(_bcc().utils.get_possible_cpus())


def percpu_totals(table):
    """Every entry of a per-CPU array of u64 counters, summed over CPUs: a
    numpy array (entries x fields) and the field names, read in a few
    syscalls (a scrape of 4096 backends costs about as much as one)."""
    import numpy as np  # noqa: PLC0415

    leaf_t = getattr(table, "sLeaf", table.Leaf)
    names = [f for f, _ in leaf_t._fields_]
    size = ctypes.sizeof(leaf_t)
    if size != 8 * len(names):
        raise BpfError(f"map {table.name!r}: its values are not all u64 counters")
    ncpu, entries = possible_cpus(), table.max_entries
    raw = libbpf.array_read(table.map_fd, entries, size * ncpu, name=leaf_t.__name__)
    arr = np.frombuffer(raw, dtype=np.uint64).reshape(entries, ncpu, len(names)).sum(axis=1)
    keep = [i for i, n in enumerate(names) if not n.startswith("pad")]
    return arr[:, keep], [names[i] for i in keep]


def leaf_from_bytes(table, raw: bytes):
    leaf_t = table.Leaf
    if len(raw) != ctypes.sizeof(leaf_t):
        raise BpfError(f"value for map {table.name!r}: {len(raw)} bytes, layout has {ctypes.sizeof(leaf_t)}")
    return leaf_t.from_buffer_copy(raw)


def source_hash(capacity: Capacity) -> str:
    """Fingerprint of the C sources and the constants they are compiled with."""
    import hashlib  # noqa: PLC0415

    h = hashlib.sha256(" ".join(consts.cflags(capacity)).encode())
    for f in sorted(XDP_DIR.glob("*.[ch]")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@dataclass(frozen=True)
class MapLayout:
    """What must match for a pinned map to be adopted by a new program."""

    kind: str
    key_size: int
    value_size: int
    entries: int
    flags: int

    def __str__(self) -> str:
        return (f"{self.kind}, key {self.key_size} B, value {self.value_size} B, "
                f"{self.entries} entries, flags {self.flags:#x}")


def layout_of(prog: Program) -> dict[str, MapLayout]:
    """Every registered map of the compiled program: the kind and flags it was
    declared with (the registry's), the sizes bcc derived from xdp/structs.h."""
    out = {}
    for m in consts.maps_of(prog.name):
        if m.kind == "ringbuf":  # no keys or values: a size in bytes
            out[m.name] = MapLayout(m.kind, 0, 0, m.entries(Capacity()), m.flags)
            continue
        t = prog.table(m.name)
        leaf = getattr(t, "sLeaf", t.Leaf)
        out[m.name] = MapLayout(m.kind, ctypes.sizeof(t.Key), ctypes.sizeof(leaf), t.max_entries, m.flags)
    return out


def _bpftool_map(path: str) -> dict | None:
    import json  # noqa: PLC0415

    if not os.path.exists(path):
        return None
    r = subprocess.run(["bpftool", "-j", "map", "show", "pinned", path], capture_output=True, text=True)
    if r.returncode:
        raise BpfError(f"cannot inspect pinned map {path}: {r.stderr.strip()}")
    return json.loads(r.stdout)


def pinned_layout(pin_dir: str) -> dict[str, MapLayout | None]:
    """The same for the maps pinned in pin_dir (None: the pin is missing)."""
    out: dict[str, MapLayout | None] = {}
    for m in consts.maps_of(consts.PROG_BALANCER):
        if not m.pinned:
            continue
        info = _bpftool_map(os.path.join(pin_dir, m.name))
        out[m.name] = None if info is None else MapLayout(
            info["type"], info["bytes_key"], info["bytes_value"], info["max_entries"], info.get("flags", 0))
    return out


def layout_differences(pin_dir: str, prog: Program) -> list[str]:
    """Each pinned map whose type, sizes, capacity or flags differ from prog's."""
    new = layout_of(prog)
    old = pinned_layout(pin_dir)
    return [f"{name}: pinned ({have}), this program ({new[name]})"
            for name, have in old.items() if have is not None and have != new[name]]


def maps_memory(pin_dir: str) -> int:
    """Kernel memory charged for the pinned maps (bpftool's bytes_memlock)."""
    total = 0
    for m in consts.maps_of(consts.PROG_BALANCER):
        info = _bpftool_map(os.path.join(pin_dir, m.name)) if m.pinned else None
        if info:
            total += int(info.get("bytes_memlock", 0))
    return total


def maps_size(prog: Program) -> int:
    """Bytes of keys and values the program's maps hold when full, from the
    compiled sizes (per-CPU maps count once per possible CPU)."""
    ncpu = len(_bcc().utils.get_possible_cpus())
    total = 0
    for lay in layout_of(prog).values():
        per = ncpu if lay.kind.startswith("percpu") else 1
        total += lay.entries if lay.kind == "ringbuf" else lay.entries * (lay.key_size + per * lay.value_size)
    return total
