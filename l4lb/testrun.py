"""BPF_PROG_TEST_RUN through libbpf (ctypes): run a loaded XDP program on a
packet buffer and get back its verdict and output bytes, or time it."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

from .errors import BpfError

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
VERDICTS = {0: "ABORTED", 1: "DROP", 2: "PASS", 3: "TX", 4: "REDIRECT"}
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1

# Room for what the program may add: outer headers, an ICMP error's headers.
_OUT_SLACK = 512


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


_libbpf = None


def _lib():
    global _libbpf
    if _libbpf is None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as e:
            raise BpfError(f"cannot load libbpf ({name}): {e}; run `make setup`") from e
        lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.POINTER(_TestRunOpts)]
        lib.bpf_prog_test_run_opts.restype = ctypes.c_int
        _libbpf = lib
    return _libbpf


@dataclass
class RunResult:
    verdict: int
    data: bytes
    duration_ns: int  # mean per run, as the kernel reports it

    @property
    def verdict_name(self) -> str:
        return VERDICTS.get(self.verdict, str(self.verdict))


def run(prog_fd: int, packet: bytes, repeat: int = 1, ifindex: int = 0,
        rx_queue: int = 0) -> RunResult:
    """Runs the program once (or `repeat` times on the same buffer: see
    bench/ for why that does not restore the input between runs)."""
    lib = _lib()
    inbuf = ctypes.create_string_buffer(packet, len(packet))
    outbuf = ctypes.create_string_buffer(len(packet) + _OUT_SLACK)
    opts = _TestRunOpts()
    opts.sz = ctypes.sizeof(_TestRunOpts)
    opts.data_in = ctypes.cast(inbuf, ctypes.c_void_p)
    opts.data_size_in = len(packet)
    opts.data_out = ctypes.cast(outbuf, ctypes.c_void_p)
    opts.data_size_out = len(outbuf)
    opts.repeat = max(1, repeat)
    ctx = None
    if ifindex:
        ctx = _XdpMd(data=0, data_end=len(packet), ingress_ifindex=ifindex,
                     rx_queue_index=rx_queue)
        opts.ctx_in = ctypes.cast(ctypes.pointer(ctx), ctypes.c_void_p)
        opts.ctx_size_in = ctypes.sizeof(ctx)
    err = lib.bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
    if err:
        errno = ctypes.get_errno() or -err
        raise BpfError(f"BPF_PROG_TEST_RUN failed: {os.strerror(errno)} (errno {errno})")
    return RunResult(opts.retval, outbuf.raw[: opts.data_size_out], opts.duration)


def run_live(prog_fd: int, packet: bytes, repeat: int, ifindex: int,
             batch_size: int = 64) -> int:
    """Live-frames mode (kernel >= 5.18): every run's XDP_TX/REDIRECT frame is
    really transmitted from `ifindex` -- a packet generator without pktgen.
    Returns the kernel's duration (ns per run)."""
    lib = _lib()
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
    err = lib.bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
    if err:
        errno = ctypes.get_errno() or -err
        raise BpfError(f"live-frames test run failed: {os.strerror(errno)} (errno {errno})")
    return opts.duration
