"""The one ctypes door to libbpf: BPF_PROG_TEST_RUN (a verdict and the output
bytes, timing, live frames), XDP attach/detach with XDP_FLAGS_REPLACE, batch
map operations, and raw access to pinned objects. Every other module reaches
libbpf through the functions here, never through the library handle."""
from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import os
from dataclasses import dataclass

from .errors import BpfError

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
VERDICTS = {0: "ABORTED", 1: "DROP", 2: "PASS", 3: "TX", 4: "REDIRECT"}
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_REPLACE = 1 << 4
MODE_FLAGS = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}

# Room for what the program may add: outer headers, an ICMP error's headers.
_OUT_SLACK = 512
_BATCH_CHUNK = 16384


class _TestRunOpts(ctypes.Structure):
    # struct bpf_test_run_opts (libbpf >= 0.7); sz tells libbpf which fields we know
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class _XdpMd(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("rx_queue_index", ctypes.c_uint32),
        ("egress_ifindex", ctypes.c_uint32),
    ]


class _SkBuffCtx(ctypes.Structure):
    # the head of struct __sk_buff up to the fields a test run may set; the
    # kernel zero-fills the rest of a shorter context
    _fields_ = [
        ("len", ctypes.c_uint32),
        ("pkt_type", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("queue_mapping", ctypes.c_uint32),
        ("protocol", ctypes.c_uint32),
        ("vlan_present", ctypes.c_uint32),
        ("vlan_tci", ctypes.c_uint32),
        ("vlan_proto", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
    ]


class _XdpAttachOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("old_prog_fd", ctypes.c_int)]


_handle = None


def _lib():
    """The loaded library with the argument types of every function used here."""
    global _handle
    if _handle is None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as e:
            raise BpfError(f"cannot load libbpf ({name}): {e}; run `make setup`") from e
        c_int, c_u32, vp = ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p
        sigs = {
            "bpf_prog_test_run_opts": [c_int, ctypes.POINTER(_TestRunOpts)],
            "bpf_prog_get_fd_by_id": [c_u32],
            "bpf_xdp_attach": [c_int, c_int, c_u32, ctypes.POINTER(_XdpAttachOpts)],
            "bpf_xdp_detach": [c_int, c_u32, vp],
            "bpf_obj_get": [ctypes.c_char_p],
            "bpf_map_lookup_elem": [c_int, vp, vp],
            "bpf_map_lookup_batch": [c_int, vp, vp, vp, vp, ctypes.POINTER(c_u32), vp],
            "bpf_map_lookup_and_delete_batch": [c_int, vp, vp, vp, vp, ctypes.POINTER(c_u32), vp],
            "bpf_map_delete_batch": [c_int, vp, ctypes.POINTER(c_u32), vp],
        }
        for fn, args in sigs.items():
            getattr(lib, fn).argtypes = args
            getattr(lib, fn).restype = c_int
        _handle = lib
    return _handle


def _fail(what: str, rc: int) -> BpfError:
    err = ctypes.get_errno() or -rc
    return BpfError(f"{what}: {os.strerror(err)} (errno {err})")


# ---- BPF_PROG_TEST_RUN ---------------------------------------------------------------
@dataclass
class RunResult:
    verdict: int
    data: bytes
    duration_ns: int  # mean per run, as the kernel reports it

    @property
    def verdict_name(self) -> str:
        return VERDICTS.get(self.verdict, str(self.verdict))


def _test_run(prog_fd: int, packet: bytes, repeat: int, ctx: ctypes.Structure | None, what: str) -> RunResult:
    inbuf = ctypes.create_string_buffer(packet, len(packet))
    outbuf = ctypes.create_string_buffer(len(packet) + _OUT_SLACK)
    opts = _TestRunOpts()
    opts.sz = ctypes.sizeof(_TestRunOpts)
    opts.data_in = ctypes.cast(inbuf, ctypes.c_void_p)
    opts.data_size_in = len(packet)
    opts.data_out = ctypes.cast(outbuf, ctypes.c_void_p)
    opts.data_size_out = len(outbuf)
    opts.repeat = max(1, repeat)
    if ctx is not None:
        opts.ctx_in = ctypes.cast(ctypes.pointer(ctx), ctypes.c_void_p)
        opts.ctx_size_in = ctypes.sizeof(ctx)
    rc = _lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
    if rc:
        raise _fail(f"{what} failed", rc)
    return RunResult(opts.retval, outbuf.raw[: opts.data_size_out], opts.duration)


def run(prog_fd: int, packet: bytes, repeat: int = 1, ifindex: int = 0,
        rx_queue: int = 0) -> RunResult:
    """Runs the program once (or `repeat` times on the same buffer: see
    bench/ for why that does not restore the input between runs)."""
    ctx = _XdpMd(data=0, data_end=len(packet), ingress_ifindex=ifindex, rx_queue_index=rx_queue) \
        if ifindex else None
    return _test_run(prog_fd, packet, repeat, ctx, "BPF_PROG_TEST_RUN")


def run_skb(prog_fd: int, packet: bytes, mark: int = 0, repeat: int = 1) -> RunResult:
    """Runs a tc (SCHED_CLS) program on an skb made of packet (an Ethernet
    frame) whose skb->mark is mark. The verdict is the TC_ACT_* return value
    as an unsigned 32-bit number (TC_ACT_UNSPEC: 0xffffffff)."""
    return _test_run(prog_fd, packet, repeat, _SkBuffCtx(mark=mark), "BPF_PROG_TEST_RUN (skb)")


def run_live(prog_fd: int, packet: bytes, repeat: int, ifindex: int,
             batch_size: int = 64) -> int:
    """Live-frames mode (kernel >= 5.18): every run's XDP_TX/REDIRECT frame is
    really transmitted from `ifindex` -- a packet generator without pktgen.
    Returns the kernel's duration (ns per run)."""
    inbuf = ctypes.create_string_buffer(packet, len(packet))
    ctx = _XdpMd(data=0, data_end=len(packet), ingress_ifindex=ifindex)
    opts = _TestRunOpts()
    opts.sz = ctypes.sizeof(_TestRunOpts)
    opts.data_in = ctypes.cast(inbuf, ctypes.c_void_p)
    opts.data_size_in = len(packet)
    opts.ctx_in = ctypes.cast(ctypes.pointer(ctx), ctypes.c_void_p)
    opts.ctx_size_in = ctypes.sizeof(ctx)
    opts.repeat = repeat
    opts.flags = BPF_F_TEST_XDP_LIVE_FRAMES
    opts.batch_size = batch_size
    rc = _lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
    if rc:
        raise _fail("live-frames test run failed", rc)
    return opts.duration


# ---- XDP attach and detach ---------------------------------------------------------
def xdp_attach(ifindex: int, prog_fd: int, mode: str, replace_id: int | None = None) -> None:
    """Attaches prog_fd to the interface. With replace_id, the kernel swaps the
    running program for the new one in one step, and only if the running one
    is still replace_id (XDP_FLAGS_REPLACE): no gap, no detach.

    (Through libbpf because pyroute2 0.7 encodes IFLA_XDP_FLAGS as 16 bits,
    which the kernel rejects with ERANGE.)"""
    lib = _lib()
    flags = MODE_FLAGS[mode]
    opts = _XdpAttachOpts(sz=ctypes.sizeof(_XdpAttachOpts), old_prog_fd=0)
    old_fd = None
    if replace_id:
        old_fd = lib.bpf_prog_get_fd_by_id(replace_id)
        if old_fd < 0:
            raise BpfError(f"XDP program id {replace_id} vanished while being replaced")
        flags |= XDP_FLAGS_REPLACE
        opts.old_prog_fd = old_fd
    else:
        flags |= XDP_FLAGS_UPDATE_IF_NOEXIST
    try:
        err = lib.bpf_xdp_attach(ifindex, prog_fd, flags, ctypes.byref(opts))
    finally:
        if old_fd is not None:
            os.close(old_fd)
    if err:
        raise BpfError(f"cannot attach XDP ({mode}) to interface {ifindex}: {os.strerror(-err)} (errno {-err})")


def xdp_detach(ifindex: int, mode: str) -> None:
    err = _lib().bpf_xdp_detach(ifindex, MODE_FLAGS[mode], None)
    if err:
        raise BpfError(f"cannot detach XDP from interface {ifindex}: {os.strerror(-err)}")


# ---- pinned objects and raw map access --------------------------------------------------
def obj_get(path: str) -> int:
    """A new fd for a pinned map or program (the caller closes it)."""
    fd = _lib().bpf_obj_get(path.encode())
    if fd < 0:
        raise _fail(f"cannot open pinned object {path}", fd)
    return fd


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    """A value by raw key bytes, or None where the key is absent."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    return v.raw if _lib().bpf_map_lookup_elem(map_fd, k, v) == 0 else None


def map_walk(map_fd: int, key_size: int, value_size: int, delete: bool = False, name: str = "") -> int:
    """Counts (or deletes) every entry of a hash map with batch operations:
    a few syscalls for a million entries. Returns how many there were."""
    lib = _lib()
    fn = lib.bpf_map_lookup_and_delete_batch if delete else lib.bpf_map_lookup_batch
    keys = ctypes.create_string_buffer(key_size * _BATCH_CHUNK)
    values = ctypes.create_string_buffer(value_size * _BATCH_CHUNK)
    token_in = ctypes.create_string_buffer(max(key_size, 8))  # a hash map's token is a bucket number
    token_out = ctypes.create_string_buffer(max(key_size, 8))
    total, first = 0, True
    while True:
        count = ctypes.c_uint32(_BATCH_CHUNK)
        rc = fn(map_fd, None if first else token_in, token_out, keys, values, ctypes.byref(count), None)
        err = ctypes.get_errno()
        total += count.value
        if rc:
            if err == _errno.ENOENT:  # walked the whole map
                return total
            raise BpfError(f"batch walk of map {name!r} failed: {os.strerror(err)}")
        ctypes.memmove(token_in, token_out, len(token_in))
        first = False


def map_delete_batch(map_fd: int, keys: bytes, key_size: int, name: str = "") -> int:
    """Deletes the given keys (packed one after another), in that order.
    Returns how many existed; stops at the first that did not."""
    n = len(keys) // key_size
    if n * key_size != len(keys):
        raise BpfError(f"{len(keys)} bytes of keys for map {name!r}: not a multiple of {key_size}")
    if not n:
        return 0
    buf = ctypes.create_string_buffer(keys, len(keys))
    done = ctypes.c_uint32(n)
    rc = _lib().bpf_map_delete_batch(map_fd, buf, ctypes.byref(done), None)
    err = ctypes.get_errno()
    if rc and err != _errno.ENOENT:
        raise BpfError(f"deleting {n} keys from map {name!r} failed: {os.strerror(err)}")
    return done.value


def array_read(map_fd: int, entries: int, value_size: int, name: str = "") -> bytes:
    """Every value of an array map (per-CPU values included: value_size is
    then the bytes of all CPUs' copies of one entry), in index order, with
    batch lookups: a few syscalls however many entries."""
    lib = _lib()
    chunk = min(entries, _BATCH_CHUNK)
    keys = ctypes.create_string_buffer(4 * chunk)
    values = ctypes.create_string_buffer(value_size * chunk)
    token_in = ctypes.create_string_buffer(4)
    token_out = ctypes.create_string_buffer(4)
    out = bytearray()
    first = True
    while True:
        count = ctypes.c_uint32(chunk)
        rc = lib.bpf_map_lookup_batch(map_fd, None if first else token_in, token_out, keys, values,
                                      ctypes.byref(count), None)
        err = ctypes.get_errno()
        out += values.raw[:count.value * value_size]
        if rc:
            if err == _errno.ENOENT:
                break
            raise BpfError(f"batch read of map {name!r} failed: {os.strerror(err)}")
        if len(out) >= entries * value_size:
            break
        ctypes.memmove(token_in, token_out, 4)
        first = False
    if len(out) != entries * value_size:
        raise BpfError(f"batch read of map {name!r}: {len(out) // value_size} of {entries} entries")
    return bytes(out)


def array_write(map_fd: int, first: int, values: bytes, value_size: int, name: str = "") -> None:
    """Writes consecutive entries first, first+1, ... of an array map with
    batch updates (a few syscalls however many entries)."""
    n = len(values) // value_size
    if n * value_size != len(values):
        raise BpfError(f"{len(values)} bytes of values for map {name!r}: not a multiple of {value_size}")
    lib = _lib()
    for start in range(0, n, _BATCH_CHUNK):
        count = min(_BATCH_CHUNK, n - start)
        keys = (ctypes.c_uint32 * count)(*range(first + start, first + start + count))
        vals = ctypes.create_string_buffer(values[start * value_size:(start + count) * value_size],
                                           count * value_size)
        done = ctypes.c_uint32(count)
        rc = lib.bpf_map_update_batch(map_fd, keys, vals, ctypes.byref(done), None)
        if rc:
            raise BpfError(f"batch write of map {name!r} failed: {os.strerror(ctypes.get_errno())}")


# ---- BPF ring buffers ---------------------------------------------------------------------
_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


class RingReader:
    """Reads a BPF_MAP_TYPE_RINGBUF map (libbpf's ring_buffer): poll() hands
    each record's bytes to on_record, in the order the program submitted them."""

    def __init__(self, map_fd: int, on_record):
        lib = _lib()
        lib.ring_buffer__new.argtypes = [ctypes.c_int, _SAMPLE_FN, ctypes.c_void_p, ctypes.c_void_p]
        lib.ring_buffer__new.restype = ctypes.c_void_p
        lib.ring_buffer__poll.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.ring_buffer__poll.restype = ctypes.c_int
        lib.ring_buffer__consume.argtypes = [ctypes.c_void_p]
        lib.ring_buffer__consume.restype = ctypes.c_int
        lib.ring_buffer__free.argtypes = [ctypes.c_void_p]
        lib.ring_buffer__free.restype = None
        self._lib = lib
        self._on_record = on_record

        def sample(_ctx, data, size):
            on_record(ctypes.string_at(data, size))
            return 0
        self._cb = _SAMPLE_FN(sample)  # kept: libbpf calls it for as long as the reader lives
        self._rb = lib.ring_buffer__new(map_fd, self._cb, None, None)
        if not self._rb:
            raise _fail("cannot open the ring buffer", -1)

    def poll(self, timeout_ms: int) -> int:
        """Waits up to timeout_ms for records; returns how many were read."""
        n = self._lib.ring_buffer__poll(self._rb, timeout_ms)
        if n < 0 and -n != _errno.EINTR:
            raise BpfError(f"reading the ring buffer failed: {os.strerror(-n)}")
        return max(n, 0)

    def consume(self) -> int:
        """Reads what is there now, without waiting."""
        return max(self._lib.ring_buffer__consume(self._rb), 0)

    def close(self) -> None:
        if self._rb:
            self._lib.ring_buffer__free(self._rb)
            self._rb = None
