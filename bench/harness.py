"""The measuring harness (harness.c) and the two baseline programs, seen from
Python: load them, give the harness its packet and its target, time a run,
and read back what the harness saw.

Why a harness at all: BPF_PROG_TEST_RUN with repeat > 1 does not restore the
input between runs, so a program that moves the head would time its own
output. See harness.c for what it does on every run."""
from __future__ import annotations

import ctypes
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from l4lb import libbpf
from l4lb.bpf import Program, compile_program
from l4lb.errors import BpfError

BENCH_DIR = Path(__file__).resolve().parent
COPY_MAX = 128  # harness.c: bytes of the frame restored on every run


def load_program(source: str, fn_name: str, cflags: list[str] | None = None) -> Program:
    """Compiles bench/<source> with bcc and loads `fn_name` as an XDP program."""
    b, fns = compile_program(source, cflags or [], [fn_name], src_dir=BENCH_DIR)
    return Program(b, fns[fn_name], fn_name)


@dataclass(frozen=True)
class Vary:
    """Byte offsets in the frame of what the harness changes to make every run a new flow:
    the source port gets the flow number's low 16 bits, the source address's last
    16-bit word its high 16 bits; the checksums that cover them are updated. After each
    run the flow number grows by `stride`; with `wrap`, modulo wrap (a resident
    population of flows, visited in the order that stride gives: see cycled())."""

    sport_off: int
    addr_off: int = 0
    ipcsum_off: int = 0
    l4csum_off: int = 0
    wrap: int = 0
    stride: int = 1

    def __post_init__(self):
        if self.wrap and not (0 < self.stride < self.wrap or self.stride == self.wrap == 1):
            raise ValueError(f"stride {self.stride}: give 1 .. wrap-1 (wrap {self.wrap})")
        if self.wrap and math.gcd(self.stride, self.wrap) != 1:
            raise ValueError(f"stride {self.stride} shares a factor with wrap {self.wrap}: "
                             "some flows would never be visited")

    def after(self, flow: int, runs: int) -> int:
        """The flow number after `runs` runs from `flow`."""
        n = flow + runs * self.stride
        return n % self.wrap if self.wrap else n & 0xFFFFFFFF

    def numbers(self, first: int, n: int) -> "np.ndarray":
        """The flow numbers of n runs from `first`, in the order the harness makes them."""
        flows = np.uint64(first) + np.arange(n, dtype=np.uint64) * np.uint64(self.stride)
        return flows % np.uint64(self.wrap) if self.wrap else flows & np.uint64(0xFFFFFFFF)

    def cycled(self, wrap: int, scattered: bool = True) -> "Vary":
        """The same offsets, the flow numbers cycling through 0 .. wrap-1. scattered: in an
        order unrelated to the numbers' own, a stride near wrap * 0.618 (the golden ratio's
        fraction, which keeps any few consecutive visits far apart in the population) and
        coprime with wrap, so that every flow is visited once per cycle. A table that
        allocates entries in the order flows are made (the kernel's LRU hash takes its
        nodes off a free list) would otherwise be read in memory order, prefetched, which
        real traffic, the packets of many flows interleaved, never does."""
        stride = 1
        if scattered and wrap > 2:
            stride = round(wrap * (math.sqrt(5) - 1) / 2)
            while math.gcd(stride, wrap) != 1:
                stride += 1
        return Vary(self.sport_off, self.addr_off, self.ipcsum_off, self.l4csum_off, wrap,
                    stride)

    def apply(self, frame: bytes, flow: int) -> bytes:
        """The frame as the harness leaves it for flow number `flow` (for checks)."""
        out = bytearray(frame)

        def bump(off: int, by: int, in_ip_header: bool) -> None:
            old = int.from_bytes(out[off:off + 2], "big")
            new = (old + by) & 0xFFFF
            out[off:off + 2] = new.to_bytes(2, "big")
            for csum_off, covers in ((self.ipcsum_off, in_ip_header), (self.l4csum_off, True)):
                if csum_off and covers:
                    c = int.from_bytes(out[csum_off:csum_off + 2], "big")
                    out[csum_off:csum_off + 2] = _csum_update(c, old, new).to_bytes(2, "big")

        bump(self.sport_off, flow & 0xFFFF, False)
        if self.addr_off:
            bump(self.addr_off, flow >> 16, True)
        return bytes(out)


def _csum_update(check: int, old: int, new: int) -> int:
    s = (~check & 0xFFFF) + (~old & 0xFFFF) + new
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@dataclass
class HarnessCounts:
    runs: int
    moved: int        # runs that found the head moved and moved it back
    moved_bytes: int  # sum of those moves (bytes)
    failed: int
    flow: int         # the next flow number (on the CPU that ran)


@dataclass
class Timing:
    kernel_ns: int     # the kernel's mean per run (integer ns, excludes time rescheduled)
    wall_ns: float     # wall clock around the syscall / repeat
    result: libbpf.RunResult


def time_run(prog_fd: int, frame: bytes, repeat: int, ifindex: int = 0) -> Timing:
    """ifindex: the ingress interface the program sees (0: the loopback device)."""
    t0 = time.perf_counter_ns()
    r = libbpf.run(prog_fd, frame, repeat=repeat, ifindex=ifindex)
    t1 = time.perf_counter_ns()
    return Timing(r.duration_ns, (t1 - t0) / repeat, r)


class Harness:
    """harness.c loaded, with the baseline programs it is compared with."""

    def __init__(self):
        self.prog = load_program("harness.c", "harness", [f"-DCOPY_MAX={COPY_MAX}"])
        self.drop = load_program("baseline_drop.c", "drop")
        self.encap = load_program("baseline_encap.c", "encap")
        self._state = self.prog.table("harness_state")
        self._target = self.prog.table("target")
        self.frame = b""
        self.vary: Vary | None = None
        self.ifindex = 0  # the ingress interface of the timed runs (0: the loopback device)

    @property
    def fd(self) -> int:
        return self.prog.fd

    def set_target(self, fd: int) -> None:
        """The program the harness tail-calls (slot 0 of its BPF_PROG_ARRAY)."""
        try:
            self._target[ctypes.c_int(0)] = ctypes.c_int(fd)
        except Exception as e:  # bcc raises bare Exception
            raise BpfError(f"cannot put program fd {fd} into the harness's program array: "
                           f"{e}") from e

    def load_frame(self, frame: bytes, vary: Vary | None = None, flow: int = 0) -> None:
        """Stores the frame that every run starts from (on every CPU), clears the
        harness's counters, and sets the first flow number when `vary` is given."""
        if len(frame) < 14:
            raise BpfError(f"frame of {len(frame)} bytes: an Ethernet frame has at least 14")
        offsets = (vary.sport_off, vary.addr_off, vary.ipcsum_off, vary.l4csum_off) if vary else ()
        for off in offsets:
            if off and off + 2 > min(len(frame), COPY_MAX):
                raise BpfError(f"vary offset {off} is outside the first {COPY_MAX} bytes "
                               "of the frame")
        t = self._state
        leaf_t = getattr(t, "sLeaf", t.Leaf)
        copy_len = min(len(frame), COPY_MAX)
        values = t[t.Key(0)]
        for cpu in range(len(values)):
            v = leaf_t()
            v.len = len(frame)
            v.copy_len = copy_len
            if vary:
                v.sport_off, v.addr_off = vary.sport_off, vary.addr_off
                v.ipcsum_off, v.l4csum_off = vary.ipcsum_off, vary.l4csum_off
                v.flow = vary.after(flow, 0)
                v.wrap = vary.wrap
                v.stride = vary.stride
            ctypes.memmove(v.bytes, frame, copy_len)
            values[cpu] = v
        t[t.Key(0)] = values
        self.frame, self.vary = frame, vary

    def counts(self) -> HarnessCounts:
        t = self._state
        values = t[t.Key(0)]
        ran = [v for v in values if v.runs]
        return HarnessCounts(
            runs=sum(v.runs for v in values),
            moved=sum(v.moved for v in values),
            moved_bytes=sum(v.moved_bytes for v in values),
            failed=sum(v.failed for v in values),
            flow=ran[0].flow if len(ran) == 1 else -1,
        )

    def time(self, target_fd: int, repeat: int) -> Timing:
        self.set_target(target_fd)
        return time_run(self.fd, self.frame, repeat, self.ifindex)

    def close(self) -> None:
        for p in (self.prog, self.drop, self.encap):
            p.close()
