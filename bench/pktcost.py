"""Per-packet cost of the balancer in the kernel, with BPF_PROG_TEST_RUN.

    .venv/bin/python -m bench.pktcost [--quick] [--rounds N] [--repeat N] [--out PATH]

Every case runs `repeat` times per round through the harness (harness.c),
which puts the original frame back before each run and tail-calls the
program under test. The same harness tail-calling a plain XDP_DROP program is
timed right before and right after, on the same frame, and the lower of the
two is subtracted:

    net(X)   = time(harness -> X) - time(harness -> XDP_DROP)
             = what X costs beyond a program that returns at once;
    gross(X) = net(X) + time(XDP_DROP run directly)
             = what X costs per packet including the fixed cost that every XDP
               program pays here (the test-run loop and the call into the program).

Programs that never change the packet (XDP_DROP, the balancer's XDP_PASS) are
also timed directly, which checks the subtraction: gross(pass) must match the
direct time of the pass case.

After each timed run the path is proven, not assumed: the balancer's global
counters must have moved by exactly `repeat` for the counters of the expected
path and by 0 for every other one, the harness must have run `repeat` times and
moved the head back after every encapsulation, the last run's verdict and
output must equal a single direct run on the same packet, and the SYN case
must leave exactly `repeat` new entries in the connection table. A tail call
never returns, so verdicts are counted from the balancer's counters (each
verdict path moves exactly one of them).

Timings are the kernel's: the mean per run in whole ns, leaving out the time
the CPU gave to other tasks. The wall clock around the syscall is kept in the
JSON too; it counts that time, so on a busy machine it reads well above.

The SYN cases depend on the state of the connection table, so each has one
that every round finds again: `syn` inserts into free entries, handed out in
the order of the first fill after loading (each round's flows are deleted
newest first, see ctmap.py); `syn_evict` runs on a second balancer whose table
was filled once and stays full, so every insert evicts (a long-running LB
under a flood of new flows)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from l4lb import bpf, consts, libbpf
from l4lb.dataplane import Dataplane, RuntimeConfig
from l4lb.errors import L4lbError
from l4lb.model import VipKey, VipSpec
from l4lb.state import LbState
from l4lb.libbpf import XDP_DROP, XDP_PASS, XDP_TX

from . import ctmap
from .harness import Harness, Timing, Vary, time_run

DEFAULT_REPEAT = 1_000_000
QUICK_REPEAT = 100_000
DEFAULT_ROUNDS = 5
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "pktcost.json"

# addresses: the benchmarking plan only (198.18.0.0/15, fd00:198:18::/48), 02:... MACs
CLIENT_MAC = "02:00:00:00:00:0c"
LB_MAC = "02:00:00:00:01:01"
GW_MAC = "02:00:00:00:00:01"
CLIENT4 = "198.18.0.5"
CLIENT6 = "fd00:198:18::5"
VIP4 = "198.18.10.10"         # TCP :80 and UDP :53, IPv4 backends (4in4)
VIP4_TO_V6 = "198.18.10.11"   # TCP :80, IPv6 backends (4in6)
VIP6 = "fd00:198:18:10::10"   # TCP :80, IPv6 backends (6in6)
NOT_A_VIP = "198.18.1.1"      # the LB's own link address: XDP_PASS
BACKENDS4 = [f"198.18.2.{i}" for i in range(1, 9)]
BACKENDS6 = [f"fd00:198:18:2::{i}" for i in range(1, 9)]
ICMP_RATE_UNLIMITED = 0xFFFFFFFF
EVICT_SLACK = 16  # entries a full LRU table may gain or lose: evictions come in small batches

# verdict paths of balancer.c: every path moves exactly one of these counters
VERDICT_COUNTERS = {
    "TX": ("tx", "too_big", "icmp_echo"),
    "PASS": ("pass",),
    "DROP": ("no_backend", "icmp_limited", "error", "fragment", "ext_header", "malformed"),
}

TARGETS = {  # docs: performance targets (ratios from one run on one machine)
    "established / encap": 2.0,
    "syn / encap": 5.0,
    "pass / drop": 2.0,
    "syn_evict / encap": 5.0,  # the same target, for a table that is full (steady state)
}


# ---- the cases ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    name: str
    title: str
    frame: bytes
    target: str                 # "lb", "encap" (baseline_encap.c) or "drop" (baseline_drop.c)
    verdict: int
    counters: tuple[str, ...] = ()  # balancer counters that move by exactly one per run
    head_moves: int = 0         # bytes the program grows the head by (the harness moves it back)
    vip: VipKey | None = None   # VIP whose per-VIP counters move by one per run
    harness: bool = True        # False: timed directly (the program leaves the packet as it was)
    prime: bool = False         # run once first: the flow's connection-table entry exists
    vary: Vary | None = None    # every run a new flow (new connection-table entry)
    fill_table: bool = False    # the table is full before timing: every insert evicts


def _eth():
    return Ether(src=CLIENT_MAC, dst=LB_MAC)


def _ack(sport: int):
    return TCP(sport=sport, dport=80, flags="A", seq=1001, ack=5001, window=502,
               options=[("NOP", None), ("NOP", None), ("Timestamp", (2000, 1000))])


def build_cases() -> list[Case]:
    syn = bytes(_eth() / IP(src=CLIENT4, dst=VIP4, flags="DF", ttl=64) /
                TCP(sport=40000, dport=80, flags="S", seq=1000, window=64240,
                    options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1000, 0)),
                             ("NOP", None), ("WScale", 7)]))
    ip_off = 14
    syn_vary = Vary(sport_off=ip_off + 20, addr_off=ip_off + 14, ipcsum_off=ip_off + 10,
                    l4csum_off=ip_off + 20 + 16)
    est = bytes(_eth() / IP(src=CLIENT4, dst=VIP4, flags="DF", ttl=64) / _ack(40001))
    udp = bytes(_eth() / IP(src=CLIENT4, dst=VIP4, ttl=64) / UDP(sport=40002, dport=53) /
                Raw(bytes(range(40))))
    v6 = bytes(_eth() / IPv6(src=CLIENT6, dst=VIP6, hlim=64) / _ack(40003))
    v4in6 = bytes(_eth() / IP(src=CLIENT4, dst=VIP4_TO_V6, flags="DF", ttl=64) / _ack(40004))
    passing = bytes(_eth() / IP(src=CLIENT4, dst=NOT_A_VIP, flags="DF", ttl=64) /
                    TCP(sport=40005, dport=22, flags="A", seq=1, ack=1,
                        options=[("NOP", None), ("NOP", None), ("Timestamp", (2000, 1000))]))
    echo = bytes(_eth() / IP(src=CLIENT4, dst=VIP4, ttl=64) / ICMP(type=8, id=0x4242, seq=1) /
                 Raw(bytes(range(56))))
    tcp80 = VipKey(VIP4, 80, "tcp")
    return [
        Case("established", "TCP established (connection-table hit), 4in4", est, "lb", XDP_TX,
             ("tx", "ct_hit"), 20, tcp80, prime=True),
        Case("syn", "TCP SYN, a new connection-table entry per run, 4in4", syn, "lb", XDP_TX,
             ("tx", "ct_miss", "ct_insert"), 20, tcp80, vary=syn_vary),
        Case("syn_evict", "TCP SYN into a full table (each insert evicts), 4in4", syn, "lb",
             XDP_TX, ("tx", "ct_miss", "ct_insert"), 20, tcp80, vary=syn_vary, fill_table=True),
        Case("udp", "UDP established (connection-table hit), 4in4", udp, "lb", XDP_TX,
             ("tx", "ct_hit"), 20, VipKey(VIP4, 53, "udp"), prime=True),
        Case("v6", "IPv6 TCP established, 6in6", v6, "lb", XDP_TX,
             ("tx", "ct_hit"), 40, VipKey(VIP6, 80, "tcp"), prime=True),
        Case("v4_in_v6", "IPv4 VIP, IPv6 backend, TCP established, 4in6", v4in6, "lb", XDP_TX,
             ("tx", "ct_hit"), 40, VipKey(VIP4_TO_V6, 80, "tcp"), prime=True),
        Case("pass", "packet for no VIP (XDP_PASS)", passing, "lb", XDP_PASS, ("pass",)),
        Case("icmp_echo", "ICMP echo request to a VIP, answered", echo, "lb", XDP_TX,
             ("icmp_echo",)),
        Case("encap", "baseline: minimal IPIP encap + XDP_TX", est, "encap", XDP_TX, (), 20),
        Case("pass_direct", "packet for no VIP, timed directly (no harness)", passing, "lb",
             XDP_PASS, ("pass",), harness=False),
        Case("drop_direct", "baseline: XDP_DROP, timed directly (no harness)", est, "drop",
             XDP_DROP, harness=False),
    ]


def add_vips(state: LbState) -> None:
    def add(address, port, proto, backends):
        state.add_vip(VipSpec(VipKey.parse(address, port, proto), frozenset(),
                              {b: 1 for b in backends}))

    add(VIP4, 80, "tcp", BACKENDS4)
    add(VIP4, 53, "udp", BACKENDS4)
    add(VIP6, 80, "tcp", BACKENDS6)
    add(VIP4_TO_V6, 80, "tcp", BACKENDS6)


# ---- one timed run and its proof -------------------------------------------------------------

@dataclass
class RoundResult:
    case: str
    round: int
    repeat: int
    ns: int                         # kernel: ns per run (harness included when through it)
    wall_ns: float
    harness_ns: int | None = None   # the harness alone (-> XDP_DROP), same frame: the lower
    harness_runs_ns: list[int] = field(default_factory=list)  # of these two, before and after
    harness_wall_ns: float | None = None
    net_ns: int | None = None
    verdicts: dict[str, int] = field(default_factory=dict)
    verdict_source: str = ""
    counters: dict[str, int] = field(default_factory=dict)  # nonzero deltas
    harness_counts: dict[str, int] = field(default_factory=dict)
    new_entries: int | None = None  # SYN: the run's flows found; full table: the size change
    failures: list[str] = field(default_factory=list)


def pin_to_cpu(cpu: int | None) -> tuple[set[int], int]:
    """Moves this process to one CPU (the last allowed one by default): the
    harness's flow numbers, the per-CPU counters and the connection table's
    per-CPU LRU lists must all be the same CPU's. Returns (the affinity to
    restore, the CPU)."""
    saved = os.sched_getaffinity(0)
    allowed = sorted(saved)
    cpu = allowed[-1] if cpu is None else cpu
    if cpu not in allowed:
        raise L4lbError(f"CPU {cpu}: this process may run on CPUs {allowed}")
    os.sched_setaffinity(0, {cpu})
    return saved, cpu


def possible_cpus() -> int:
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


class Balancer:
    """One loaded balancer with the benchmark's configuration and VIPs (`setup` adds
    them: this benchmark's four by default)."""

    def __init__(self, capacity: consts.Capacity, setup=add_vips):
        self.capacity = capacity
        self.prog = bpf.load_balancer(capacity)
        self.dp = Dataplane(self.prog, capacity)
        self.dp.clear()
        self.dp.write_config(RuntimeConfig(gateway_mac=GW_MAC, new_flow_rate=0,
                                           icmp_rate=ICMP_RATE_UNLIMITED), portless_vips=0)
        self.state = LbState(capacity, self.dp)
        setup(self.state)
        self.dp.set_portless(self.state.portless)
        self.conntrack = self.prog.table(consts.MAP_CONNTRACK)

    def stats(self, vip: VipKey | None) -> tuple[dict[str, int], int]:
        packets = self.dp.vip_stats(self.state.vips[vip].vip_id)["packets"] if vip else 0
        return self.dp.global_stats(), packets

    def close(self) -> None:
        self.prog.close()


class PktCost:
    """The balancers, the harness and the cases. Two balancers: `main` for
    every case but one, `full` for the SYN case into a full table, whose
    connection table is filled once and stays full (every insert evicts)."""

    def __init__(self, repeat: int, cpu: int | None = None, full_table: bool = True,
                 harness: Harness | None = None):
        """harness: one already loaded (it stays open on close()); by default its own."""
        if repeat < 2:
            raise L4lbError(f"repeat {repeat}: give at least 2 (the harness proves its restores "
                            "from the second run on)")
        self.repeat = repeat
        self._affinity, self.cpu = pin_to_cpu(cpu)
        self.ncpus = possible_cpus()
        # The SYN case needs room for one round of new entries on the CPU that runs it:
        # with per-CPU LRU lists each CPU owns ct_size / possible CPUs of the entries.
        self.capacity = consts.Capacity(max_vips=8, max_backends=64,
                                        ct_size=max(65536, (repeat + 1024) * self.ncpus))
        self.share = self.capacity.ct_size // self.ncpus
        self.next_flow = 0
        self.cases = [c for c in build_cases() if full_table or not c.fill_table]
        self.lbs: dict[str, Balancer] = {}
        self._own_harness = harness is None
        try:
            self.harness = harness or Harness()
            self.lbs["main"] = Balancer(self.capacity)
            if full_table:
                self.lbs["full"] = Balancer(self.capacity)
                self._fill(self.lbs["full"], self.case("syn_evict"))
            # the established flows' entries, made before the SYN case first takes free entries
            for c in self.cases:
                if c.prime:
                    self.direct(c)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if hasattr(self, "harness") and self._own_harness:
            self.harness.close()
        for lb in self.lbs.values():
            lb.close()
        os.sched_setaffinity(0, self._affinity)

    def case(self, name: str) -> Case:
        for c in self.cases:
            if c.name == name:
                return c
        raise KeyError(name)

    def lb(self, case: Case) -> Balancer:
        return self.lbs["full" if case.fill_table else "main"]

    def target_fd(self, case: Case) -> int:
        if case.target == "lb":
            return self.lb(case).prog.fd
        return {"encap": self.harness.encap.fd, "drop": self.harness.drop.fd}[case.target]

    def direct(self, case: Case, frame: bytes | None = None) -> libbpf.RunResult:
        """One run of the program under test on the frame, without the harness."""
        return libbpf.run(self.target_fd(case), frame if frame is not None else case.frame)

    def through_harness(self, case: Case, repeat: int = 1) -> libbpf.RunResult:
        """`repeat` untimed runs through the harness (new flows if the case varies them)."""
        self.harness.load_frame(case.frame, case.vary, self.next_flow)
        r = self.harness.time(self.target_fd(case), repeat).result
        if case.vary:
            self.next_flow += repeat
        return r

    def _fill(self, lb: Balancer, case: Case) -> None:
        """Inserts new flows until the table stops growing: from then on every insert
        on this CPU evicts the least recently used entry."""
        entries = ctmap.count(lb.conntrack)
        chunk = self.share
        for _ in range(4 * self.ncpus + 4):
            self.through_harness(case, chunk)
            now = ctmap.count(lb.conntrack)
            grew, entries = now - entries, now
            if grew < chunk // 2:
                return
        raise L4lbError(f"the connection table of {self.capacity.ct_size} entries never filled")

    def _harness_alone(self, case: Case, fails: list[str]) -> Timing:
        """The harness tail-calling XDP_DROP, on the case's frame (and flows)."""
        self.harness.load_frame(case.frame, case.vary, self.next_flow)
        t = self.harness.time(self.harness.drop.fd, self.repeat)
        hb = self.harness.counts()
        if case.vary:
            self.next_flow += self.repeat
        if t.result.verdict != XDP_DROP or hb.runs != self.repeat or hb.moved or hb.failed:
            fails.append(f"harness alone: verdict {t.result.verdict_name}, {hb}")
        return t

    def measure(self, case: Case, round_no: int = 1) -> RoundResult:
        repeat = self.repeat
        fails: list[str] = []
        lb = self.lb(case) if case.target == "lb" else None
        if case.prime:
            r = self.direct(case)
            if r.verdict != case.verdict:
                fails.append(f"priming run: verdict {r.verdict_name}")
        expected_out = None if case.vary else self.direct(case)

        res = RoundResult(case.name, round_no, repeat, 0, 0.0)
        if case.harness:
            before = self._harness_alone(case, fails)

        flow0 = self.next_flow
        entries0 = ctmap.count(lb.conntrack) if case.vary else 0
        g0, p0 = lb.stats(case.vip) if lb else ({}, 0)
        if case.harness:
            self.harness.load_frame(case.frame, case.vary, flow0)
            t = self.harness.time(self.target_fd(case), repeat)
            hc = self.harness.counts()
        else:
            t = time_run(self.target_fd(case), case.frame, repeat)
            hc = None
        g1, p1 = lb.stats(case.vip) if lb else ({}, 0)
        if case.vary:
            self.next_flow += repeat
        res.ns, res.wall_ns = t.kernel_ns, t.wall_ns
        if case.harness:
            # the harness alone once more: the lower of the two, timed around the case, is
            # the one that the machine's noise touched least
            after = self._harness_alone(case, fails)
            res.harness_runs_ns = [before.kernel_ns, after.kernel_ns]
            best = min(before, after, key=lambda x: x.kernel_ns)
            res.harness_ns, res.harness_wall_ns = best.kernel_ns, best.wall_ns
            res.net_ns = res.ns - res.harness_ns

        # the path: the balancer's counters
        if lb:
            delta = {k: g1[k] - g0[k] for k in g1}
            res.counters = {k: v for k, v in delta.items() if v}
            for k, v in delta.items():
                want = repeat if k in case.counters else 0
                if v != want:
                    fails.append(f"counter {k}: moved by {v}, expected {want}")
            if case.vip and p1 - p0 != repeat:
                fails.append(f"VIP {case.vip} packets: moved by {p1 - p0}, expected {repeat}")
            res.verdicts = {name: sum(delta[c] for c in cs)
                            for name, cs in VERDICT_COUNTERS.items() if sum(delta[c] for c in cs)}
            res.verdict_source = "balancer counters"
        elif case.target == "encap":
            # its only other exit is XDP_ABORTED (no headroom); each XDP_TX grew the head by
            # 20 bytes, which the harness found and undid on the next run
            tx = (hc.moved if hc.moved_bytes == 20 * hc.moved else 0) + \
                (t.result.verdict == XDP_TX)
            res.verdicts = {"TX": tx} if tx == repeat else {"TX": tx, "other": repeat - tx}
            res.verdict_source = "head grown by 20 bytes (harness), and the last run's verdict"
        else:
            res.verdicts = {libbpf.VERDICTS[case.verdict]: repeat}
            res.verdict_source = "single-exit program, and the last run's verdict"
        want = libbpf.VERDICTS[case.verdict]
        if sum(res.verdicts.values()) != repeat or res.verdicts.get(want) != repeat:
            fails.append(f"verdicts {res.verdicts}, expected {want}={repeat}")

        # the harness ran every time and undid every head move
        if hc is not None:
            res.harness_counts = asdict(hc)
            want_moved = repeat - 1 if case.head_moves else 0
            if hc.runs != repeat or hc.failed or hc.moved != want_moved or \
                    hc.moved_bytes != case.head_moves * want_moved:
                fails.append(f"harness: {hc}; expected {repeat} runs, {want_moved} head moves "
                             f"of {case.head_moves} bytes")
            if case.vary and hc.flow != (flow0 + repeat) & 0xFFFFFFFF:
                fails.append(f"harness flow number {hc.flow}, expected {flow0 + repeat}")

        # every SYN made its own new entry
        if case.vary:
            entries1 = ctmap.count(lb.conntrack)
            if case.fill_table:
                # the kernel evicts a few entries at a time: allow that much movement
                res.new_entries = entries1 - entries0
                if abs(entries1 - entries0) > EVICT_SLACK:
                    fails.append(f"full table: {entries0} entries before, {entries1} after; "
                                 "every insert should have evicted one")
            else:
                # delete exactly this round's flows, newest first (see ctmap.py)
                keys = ctmap.flow_keys(lb.conntrack, case.frame, case.vary, flow0, repeat)
                res.new_entries = ctmap.delete_keys(lb.conntrack, keys)
                if entries1 - entries0 != repeat or res.new_entries != repeat:
                    fails.append(f"connection table: {entries1 - entries0} new entries, "
                                 f"{res.new_entries} of the {repeat} flows found; expected all")

        # the last run's verdict and output are those of a direct run on its packet
        if t.result.verdict != case.verdict:
            fails.append(f"last run: verdict {t.result.verdict_name}, expected {want}")
        if case.vary:
            last = flow0 + repeat - 1
            expected_out = self.direct(case, case.vary.apply(case.frame, last))
            if not case.fill_table:
                ctmap.delete_keys(lb.conntrack, ctmap.flow_keys(lb.conntrack, case.frame,
                                                                 case.vary, last, 1))
        if t.result.data != expected_out.data:
            fails.append("last run: output differs from a direct run on its packet")
        res.failures = fails
        return res


# ---- summaries ---------------------------------------------------------------------------------

def _minmed(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values)}


def summarize(results: dict[str, list[RoundResult]]) -> dict:
    """min: from the fastest round of each series (case, harness alone, plain XDP_DROP), the
    best estimate on a machine whose noise only ever adds time; median: over rounds of the
    differences taken within each round, which pair measurements made seconds apart."""
    drop = [r.ns for r in results["drop_direct"]]
    summary = {}
    for name, rounds in results.items():
        s = {"ns": _minmed([r.ns for r in rounds])}
        if rounds[0].net_ns is not None:
            s["harness_ns"] = _minmed([r.harness_ns for r in rounds])
            net_min = s["ns"]["min"] - s["harness_ns"]["min"]
            s["net_ns"] = {"min": net_min,
                           "median": statistics.median(r.net_ns for r in rounds)}
            s["gross_ns"] = {"min": net_min + min(drop),
                             "median": statistics.median(r.net_ns + d
                                                         for r, d in zip(rounds, drop))}
        else:
            s["gross_ns"] = s["ns"]
        summary[name] = s

    def ratio(a: dict, b: dict) -> dict:
        return {k: (a[k] / b[k] if b[k] else None) for k in ("min", "median")}

    ratios = {
        "established / encap": {"net": ratio(summary["established"]["net_ns"],
                                             summary["encap"]["net_ns"]),
                                "gross": ratio(summary["established"]["gross_ns"],
                                               summary["encap"]["gross_ns"])},
        "syn / encap": {"net": ratio(summary["syn"]["net_ns"], summary["encap"]["net_ns"]),
                        "gross": ratio(summary["syn"]["gross_ns"], summary["encap"]["gross_ns"])},
        "pass / drop": {"gross": ratio(summary["pass_direct"]["ns"],
                                       summary["drop_direct"]["ns"]),
                        "gross_via_harness": ratio(summary["pass"]["gross_ns"],
                                                   summary["drop_direct"]["ns"])},
    }
    if "syn_evict" in summary:
        ratios["syn_evict / encap"] = {
            "net": ratio(summary["syn_evict"]["net_ns"], summary["encap"]["net_ns"]),
            "gross": ratio(summary["syn_evict"]["gross_ns"], summary["encap"]["gross_ns"])}
    for name, r in ratios.items():
        r["target"] = TARGETS[name]
    return {"cases": summary, "ratios": ratios}


def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    vulns = {}
    vdir = Path("/sys/devices/system/cpu/vulnerabilities")
    if vdir.is_dir():
        for f in sorted(vdir.iterdir()):
            try:
                vulns[f.name] = f.read_text().strip()
            except OSError:
                pass
    try:
        import bcc  # noqa: PLC0415
        bcc_version = getattr(bcc, "__version__", "")
    except ImportError:
        bcc_version = ""
    return {"cpu_model": model, "cores": os.cpu_count(), "possible_cpus": possible_cpus(),
            "kernel": platform.release(), "machine": platform.machine(),
            "python": platform.python_version(), "bcc": bcc_version,
            "cpu_vulnerabilities": vulns}


# ---- the command -------------------------------------------------------------------------------

def _fmt(v, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}"


def render(console, report: dict) -> None:
    from rich.table import Table  # noqa: PLC0415

    s = report["summary"]["cases"]
    t = Table(title=f"per-packet cost, ns (repeat {report['settings']['repeat']:,}, "
                    f"{report['settings']['rounds']} rounds; net = minus the harness -> XDP_DROP)")
    for col, just in (("case", "left"), ("path proven per run", "left"), ("harness", "right"),
                      ("net min", "right"), ("net median", "right"), ("gross median", "right")):
        t.add_column(col, justify=just)
    for case in report["cases"]:
        name = case["name"]
        c = s[name]
        if case["counters"]:
            path = ", ".join(case["counters"])
        elif case["head_moves"]:
            path = f"head +{case['head_moves']} B, restored"
        else:
            path = "single exit"
        t.add_row(f"{name}\n[dim]{case['title']}[/dim]", f"{case['verdict']}: {path}",
                  _fmt(c.get("harness_ns", {}).get("median")),
                  _fmt(c.get("net_ns", {}).get("min")), _fmt(c.get("net_ns", {}).get("median")),
                  _fmt(c["gross_ns"]["median"]))
    console.print(t)

    r = Table(title="ratios (from the min / the median over rounds)")
    for col in ("ratio", "net", "gross", "target", "median meets it"):
        r.add_column(col, justify="left" if col == "ratio" else "right")
    for name, v in report["summary"]["ratios"].items():
        net = v.get("net")
        gross = v["gross"]
        r.add_row(name,
                  f"{_fmt(net['min'], 2)} / {_fmt(net['median'], 2)}" if net else "-",
                  f"{_fmt(gross['min'], 2)} / {_fmt(gross['median'], 2)}",
                  f"<= {v['target']:g}",
                  ", ".join(f"{k}: {'yes' if v[k]['median'] <= v['target'] else 'NO'}"
                            for k in ("net", "gross") if k in v))
    console.print(r)
    console.print("[dim]net: beyond a program that returns at once; gross: net + the cost of "
                  "a plain XDP_DROP program run directly. pass / drop has no net form (the "
                  "drop baseline's net is 0 by definition).[/dim]")


def plot(report: dict, path: Path) -> bool:
    """Net cost per case (bar: median, tick: min) as a PNG; False without matplotlib."""
    if "drop_direct" not in report["summary"]["cases"]:
        return False
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return False
    s = report["summary"]["cases"]
    names = [c["name"] for c in report["cases"] if "net_ns" in s[c["name"]]]
    med = [s[n]["net_ns"]["median"] for n in names]
    low = [s[n]["net_ns"]["min"] for n in names]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar(names, med, color="#4c72b0", label="median")
    ax.scatter(names, low, marker="_", s=400, color="black", zorder=3, label="min")
    ax.set_ylabel("ns per packet, net of the harness")
    ax.legend()
    m = report["machine"]
    ax.set_title(f"l4lb per-packet cost\n"
                 f"{m['cpu_model']}, kernel {m['kernel']}, repeat "
                 f"{report['settings']['repeat']:,} x {report['settings']['rounds']} rounds",
                 fontsize=10)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(repeat: int, rounds: int, out: Path | None, cpu: int | None = None,
        console=None, bench: PktCost | None = None) -> dict:
    """Measures every case for `rounds` rounds, shows the tables, writes the JSON
    (and a PNG beside it). With `bench` given, uses it and leaves it open."""
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
        TimeElapsedColumn  # noqa: PLC0415

    console = console or Console()
    started = time.time()
    owned = bench is None
    if owned:
        console.print(f"loading two balancers (connection tables with room for {repeat:,} new "
                      "entries per round; one is then filled) and the harness")
        bench = PktCost(repeat, cpu)
        console.print(f"pinned to CPU {bench.cpu}; ready in {time.time() - started:.1f} s")
    repeat = bench.repeat
    results: dict[str, list[RoundResult]] = {c.name: [] for c in bench.cases}
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=True) as progress:
            task = progress.add_task("measuring", total=rounds * len(bench.cases))
            for rnd in range(1, rounds + 1):
                for case in bench.cases:
                    progress.update(task, description=f"round {rnd}/{rounds}: {case.name}")
                    rr = bench.measure(case, rnd)
                    results[case.name].append(rr)
                    verdicts = " ".join(f"{k}={v:,}" for k, v in rr.verdicts.items())
                    timing = (f"net {rr.net_ns:4d} ns (harness {rr.harness_ns} ns)"
                              if rr.net_ns is not None else f"direct {rr.ns:4d} ns")
                    status = "[green]ok[/green]" if not rr.failures else \
                        "[red]FAILED: " + "; ".join(rr.failures) + "[/red]"
                    progress.console.print(f"round {rnd} {case.name:12s} {timing:32s} "
                                           f"{verdicts:18s} {status}")
                    progress.advance(task)
    finally:
        if owned:
            bench.close()

    failures = [f"{r.case} round {r.round}: {f}" for rs in results.values() for r in rs
                for f in r.failures]
    report = {
        "benchmark": "pktcost",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 1),
        "machine": machine(),
        "settings": {"repeat": repeat, "rounds": rounds, "cpu": bench.cpu,
                     "ct_size": bench.capacity.ct_size, "ring_size": bench.capacity.ring_size,
                     "backends_per_vip": len(BACKENDS4), "new_flow_rate": 0,
                     "icmp_rate": ICMP_RATE_UNLIMITED},
        "method": __doc__.split("\n\n", 2)[2].strip(),
        "cases": [{"name": c.name, "title": c.title, "target": c.target,
                   "through_harness": c.harness, "frame_bytes": len(c.frame),
                   "head_moves": c.head_moves,
                   "verdict": libbpf.VERDICTS[c.verdict], "counters": list(c.counters),
                   "rounds": [asdict(r) for r in results[c.name]]} for c in bench.cases],
        "summary": summarize(results),
        "ok": not failures,
        "failures": failures,
    }
    render(console, report)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {out}")
        png = out.with_suffix(".png")
        if plot(report, png):
            console.print(f"wrote {png}")
    if failures:
        console.print(f"[red]{len(failures)} proof(s) failed: the timings above are not "
                      "trustworthy[/red]")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pktcost",
                                 description="Per-packet cost of the balancer (BPF_PROG_TEST_RUN).")
    ap.add_argument("--quick", action="store_true",
                    help=f"repeat {QUICK_REPEAT:,} instead of {DEFAULT_REPEAT:,}")
    ap.add_argument("--repeat", type=int, help="runs per case and round (overrides --quick)")
    ap.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                    help=f"rounds (default {DEFAULT_ROUNDS})")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="JSON results (default bench/results/pktcost.json)")
    ap.add_argument("--cpu", type=int, help="CPU to run on (default: the last one allowed)")
    args = ap.parse_args(argv)
    repeat = args.repeat or (QUICK_REPEAT if args.quick else DEFAULT_REPEAT)
    if repeat < 2 or args.rounds < 1:
        ap.error("--repeat must be at least 2 and --rounds at least 1")
    if os.geteuid() != 0:
        print("bench.pktcost loads XDP programs: run it as root", file=sys.stderr)
        return 2
    try:
        report = run(repeat, args.rounds, args.out, args.cpu)
    except L4lbError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
