"""Per-packet cost of the balancer in the kernel, with BPF_PROG_TEST_RUN.

    .venv/bin/python -m bench.pktcost [--quick] [--rounds N] [--repeat N] [--out PATH]
    .venv/bin/python -m bench.pktcost --quick --against b82801c   # A/B against a commit

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
output must equal a single direct run on the same packet, and the SYN cases
must leave exactly `repeat` new entries in the connection table, less the flows
that later SYNs of the round gave up (ct_evict; ct_syn_evict in a build with a
SYN table, whose 16,384 slots a round's SYNs share). A tail call never returns,
so verdicts are counted from the balancer's counters (each verdict path moves
exactly one of them). Where builds differ in the path (a SYN table), each build
is held to its own counters.

Timings are the kernel's: the mean per run in whole ns, leaving out the time
the CPU gave to other tasks. The wall clock around the syscall is kept in the
JSON too; it counts that time, so on a busy machine it reads well above.

The SYN cases depend on the state of the connection table, so each has one
that every round finds again: `syn` inserts into free entries, handed out in
the order of the first fill after loading (each round's flows are deleted
newest first, see ctmap.py); `syn_evict` runs on a second balancer whose table
was filled once and stays full (a long-running LB under a flood of new flows):
without a SYN table every insert evicts a flow; with one, that table is filled
too, by SYNs, and every SYN takes the slot of another that is still waiting.

Flows that must exist before a case (the resident flows, the full table, the
spread flows of bench.scaling) are made by their first packet, an ACK, which
writes its entry into the connection table, confirmed, in every build; SYNs
would only take each other's slots of a SYN table.

`syn_ack` is the other half of a new connection: every run the first packet
after its flow's SYN (the SYN sent untimed just before). A build with a SYN
table moves the SYN's entry into the connection table there (ct_promote): the
write a SYN no longer does. A SYN table holds one flow a slot, so a round goes
in batches, each the longest run of consecutive flows whose SYNs take distinct
slots (a build without a SYN table: the same batches, by the working tree's
slot function): the batch's SYNs, then its ACKs timed, the harness alone timed on
the same flows right before and after; the round's figures are the means over
its runs, and its flows are removed at its end.

The populated cases run on a third balancer whose table holds RESIDENT flows,
made once by their first packets in flow-number order. `spread` visits them in
another order: each run's flow number is the previous one plus a stride near 0.618 x
RESIDENT, modulo RESIDENT (coprime with it, so a cycle visits every flow once;
harness.c). Real traffic interleaves the packets of many flows, so no table
reads its entries in the order it allocated them; a table that takes its
entries off a free list in order (the kernel's LRU hash) would, with flows
visited in the order they were made, be read sequentially and prefetched.
`syn_resident` makes flows never seen: each table puts their entries where it
puts any new SYN's (the LRU hash: the next node of its free list; a build with
a SYN table: the flow's slot there)."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from l4lb import consts, libbpf
from l4lb.errors import L4lbError
from l4lb.libbpf import XDP_PASS, XDP_TX
from l4lb.model import VipKey, VipSpec
from l4lb.state import LbState

from . import ctmap
from .balancer import (EVICTS, ICMP_RATE_UNLIMITED, IP_OFF, VARY4, WORKTREE, Balancer, Case,
                       Loaded, Measurer, RoundResult, cost_summary, drop_case, eth, tcp, tcp4_frame)
from .common import (CLIENT4, GW_MAC, RESULTS_DIR, VIP4, finish_report, machine, progress, run_command,
                     table, utc_now)
from .harness import Harness, Vary
from .ref import Code, RefCode

# an IPv6 TCP frame made a new flow on every run (no IP checksum)
VARY6 = Vary(sport_off=IP_OFF + 40, addr_off=IP_OFF + 8 + 14, l4csum_off=IP_OFF + 40 + 16)

DEFAULT_REPEAT = 1_000_000
QUICK_REPEAT = 100_000
DEFAULT_ROUNDS = 5
DEFAULT_OUT = RESULTS_DIR / "pktcost.json"

# VIP4 (common): TCP :80 and UDP :53, IPv4 backends (4in4)
CLIENT6 = "fd00:198:18::5"
VIP4_TO_V6 = "198.18.10.11"   # TCP :80, IPv6 backends (4in6)
VIP6 = "fd00:198:18:10::10"   # TCP :80, IPv6 backends (6in6)
VIP4_GUE = "198.18.10.13"     # TCP :80, IPv4 backends, encap: gue
VIP6_GUE = "fd00:198:18:10::13"  # TCP :80, IPv6 backends, encap: gue
NOT_A_VIP = "198.18.1.1"      # the LB's own link address: XDP_PASS
VIP_RESIDENT = "198.18.10.12"  # TCP :80, IPv4 backends: the resident flows' VIP
CLIENT_RESIDENT = "198.18.0.7"  # the resident flows come from 198.18.0.7-10, other ports
CLIENT_AFTER_SYN = "198.18.0.6"  # syn_ack's flows (a series of their own): never 198.18.0.5:40001
RESIDENT = 200_000            # flows resident in the table of the populated cases
BACKENDS4 = [f"198.18.2.{i}" for i in range(1, 9)]
BACKENDS6 = [f"fd00:198:18:2::{i}" for i in range(1, 9)]

TARGETS = {  # docs: performance targets (ratios from one run on one machine)
    "established / encap": 2.0,
    "syn / encap": 5.0,
    "pass / drop": 2.0,
    "syn_evict / encap": 5.0,  # the same target, for a table that is full (steady state)
    "established_fib / established": 1.3,  # next hop from the kernel's FIB / the static gateway
    "gue / established": 1.1,  # GUE against IP-in-IP, established TCP, 4in4
    "gue6 / v6": 1.1,          # the same, 6in6
}


# ---- the cases ----------------------------------------------------------------------------

def build_cases(syn_table: bool = True) -> list[Case]:
    """The cases, with the counters of a build that has a SYN table (Code.syn_table) or of
    one that has none."""
    syn = tcp4_frame(CLIENT4, VIP4, "S", 40000)
    ack_after_syn = tcp4_frame(CLIENT_AFTER_SYN, VIP4, "A", 40000)
    est = tcp4_frame(CLIENT4, VIP4, "A", 40001)
    udp = bytes(eth() / IP(src=CLIENT4, dst=VIP4, ttl=64) / UDP(sport=40002, dport=53) /
                Raw(bytes(range(40))))
    v6 = bytes(eth() / IPv6(src=CLIENT6, dst=VIP6, hlim=64) / tcp("A", 40003))
    v4in6 = tcp4_frame(CLIENT4, VIP4_TO_V6, "A", 40004)
    passing = bytes(eth() / IP(src=CLIENT4, dst=NOT_A_VIP, flags="DF", ttl=64) /
                    TCP(sport=40005, dport=22, flags="A", seq=1, ack=1,
                        options=[("NOP", None), ("NOP", None), ("Timestamp", (2000, 1000))]))
    echo = bytes(eth() / IP(src=CLIENT4, dst=VIP4, ttl=64) / ICMP(type=8, id=0x4242, seq=1) /
                 Raw(bytes(range(56))))
    syn6 = bytes(eth() / IPv6(src=CLIENT6, dst=VIP6, hlim=64) / tcp("S", 40010))
    spread = tcp4_frame(CLIENT_RESIDENT, VIP_RESIDENT, "A", 1000)
    gue = tcp4_frame(CLIENT4, VIP4_GUE, "A", 40001)
    gue6 = bytes(eth() / IPv6(src=CLIENT6, dst=VIP6_GUE, hlim=64) / tcp("A", 40003))
    tcp80 = VipKey(VIP4, 80, "tcp")
    return [
        Case("established", "TCP established (connection-table hit), 4in4", est, "lb", XDP_TX,
             ("tx", "ct_hit"), 20, tcp80, prime=True),
        Case("established_fib", "TCP established, 4in4, next_hop fib: the FIB's answer kept per "
             "backend (fib_hops, asked again at each round's start), XDP_TX", est, "lb", XDP_TX, ("tx", "ct_hit"), 20,
             tcp80, prime=True, fib=True),
        Case("syn", "TCP SYN, a new connection-table entry per run, 4in4", syn, "lb", XDP_TX,
             ("tx", "ct_miss", "ct_insert"), 20, tcp80, vary=VARY4, may_move=EVICTS),
        Case("syn6", "IPv6 TCP SYN, a new connection-table entry per run, 6in6", syn6, "lb",
             XDP_TX, ("tx", "ct_miss", "ct_insert"), 40, VipKey(VIP6, 80, "tcp"), vary=VARY6,
             may_move=EVICTS),
        Case("syn_resident", f"TCP SYN, a new entry per run, {RESIDENT:,} flows resident, 4in4",
             syn, "lb", XDP_TX, ("tx", "ct_miss", "ct_insert"), 20, tcp80, vary=VARY4,
             resident=True, may_move=EVICTS),
        Case("syn_ack", "TCP, the first ACK after its flow's SYN (sent untimed before it; a "
             "build with a SYN table moves the SYN's entry into the connection table), 4in4",
             ack_after_syn, "lb", XDP_TX, ("tx", "ct_hit") + (("ct_promote",) if syn_table else ()),
             20, tcp80, vary=VARY4, may_move=("ct_evict",), after_syn=True),
        Case("spread", f"TCP established, every run another of {RESIDENT:,} resident flows, "
             "4in4", spread, "lb", XDP_TX, ("tx", "ct_hit"), 20,
             VipKey(VIP_RESIDENT, 80, "tcp"), vary=VARY4.cycled(RESIDENT), resident=True),
        Case("syn_evict", "TCP SYN, the connection table full (without a SYN table each "
             "insert evicts a flow; with one, the SYN table is full too and each SYN takes "
             "another's slot), 4in4", syn, "lb", XDP_TX,
             ("tx", "ct_miss", "ct_insert") + (() if syn_table else ("ct_evict",)), 20, tcp80,
             vary=VARY4, fill_table=True, may_move=("ct_syn_evict",)),
        Case("udp", "UDP established (connection-table hit), 4in4", udp, "lb", XDP_TX,
             ("tx", "ct_hit"), 20, VipKey(VIP4, 53, "udp"), prime=True),
        Case("v6", "IPv6 TCP established, 6in6", v6, "lb", XDP_TX,
             ("tx", "ct_hit"), 40, VipKey(VIP6, 80, "tcp"), prime=True),
        Case("v4_in_v6", "IPv4 VIP, IPv6 backend, TCP established, 4in6", v4in6, "lb", XDP_TX,
             ("tx", "ct_hit"), 40, VipKey(VIP4_TO_V6, 80, "tcp"), prime=True),
        Case("gue", "TCP established (connection-table hit), GUE 4in4", gue, "lb", XDP_TX,
             ("tx", "ct_hit"), 28, VipKey(VIP4_GUE, 80, "tcp"), prime=True, encap="gue"),
        Case("gue6", "IPv6 TCP established, GUE 6in6", gue6, "lb", XDP_TX,
             ("tx", "ct_hit"), 48, VipKey(VIP6_GUE, 80, "tcp"), prime=True, encap="gue"),
        Case("pass", "packet for no VIP (XDP_PASS)", passing, "lb", XDP_PASS, ("pass",)),
        Case("icmp_echo", "ICMP echo request to a VIP, answered", echo, "lb", XDP_TX,
             ("icmp_echo",)),
        Case("encap", "baseline: minimal IPIP encap + XDP_TX", est, "encap", XDP_TX, (), 20),
        Case("pass_direct", "packet for no VIP, timed directly (no harness)", passing, "lb",
             XDP_PASS, ("pass",), harness=False),
        drop_case(est),
    ]


def add_vips(state: LbState) -> None:
    def add(address, port, proto, backends, encap="ipip"):
        state.add_vip(VipSpec(VipKey.parse(address, port, proto), frozenset(),
                              {b: 1 for b in backends}, encap))

    add(VIP4, 80, "tcp", BACKENDS4)
    add(VIP4, 53, "udp", BACKENDS4)
    add(VIP6, 80, "tcp", BACKENDS6)
    add(VIP4_TO_V6, 80, "tcp", BACKENDS6)
    add(VIP_RESIDENT, 80, "tcp", BACKENDS4)
    add(VIP4_GUE, 80, "tcp", BACKENDS4, "gue")
    add(VIP6_GUE, 80, "tcp", BACKENDS6, "gue")


class PktCost(Measurer):
    """The balancers, the harness and the cases. Three balancers: `main` for
    most cases; `resident`, whose table holds RESIDENT established flows made
    once, for the populated cases; `full` for the SYN case into a full table,
    whose connection table (and SYN table, if the build has one) is filled once
    and stays full. `code`: the build to load (the working tree's, or another commit's)."""

    def __init__(self, repeat: int, cpu: int | None = None, full_table: bool = True,
                 harness: Harness | None = None, code: Code = WORKTREE,
                 only: frozenset[str] = frozenset()):
        """harness: one already loaded (it stays open on close()); by default its own.
        only: the names of the cases to measure (and the baselines); all when empty."""
        super().__init__(repeat, cpu, harness)
        self.code = code
        # The SYN case needs room for one round of new entries on the CPU that runs it,
        # and the populated cases for the resident flows besides: with per-CPU LRU lists
        # (older builds) each CPU owns ct_size / possible CPUs of the entries.
        self.capacity = consts.Capacity(max_vips=8, max_backends=64,
                                        ct_size=max(65536, (repeat + 1024) * self.ncpus))
        self.resident_capacity = consts.Capacity(
            max_vips=8, max_backends=64, ct_size=(RESIDENT + repeat + 2048) * self.ncpus)
        self.share = self.capacity.ct_size // self.ncpus
        fib = "next_hop" in {f.name for f in fields(code.dataplane.RuntimeConfig)}  # older builds: no
        encaps = getattr(code.consts, "ENCAPS", {"ipip": 0})  # builds before GUE: IP-in-IP only
        self.cases = [c for c in build_cases(code.syn_table) if (full_table or not c.fill_table) and
                      (not only or c.name in only or c.target != "lb") and c.encap in encaps and
                      (fib or not c.fib)]
        names = {c.name for c in self.cases}

        def load():
            self.lbs["main"] = Balancer(self.capacity, add_vips, code)
            if any(c.fib for c in self.cases):
                self.load_fib(code)
            if names & {"spread", "syn_resident"}:
                self.load_resident(code)
            if "syn_evict" in names:
                self.lbs["full"] = Balancer(self.capacity, add_vips, code)
                self.fill_conntrack(self.lbs["full"], self.case("syn_evict"))
            # the established flows' entries, made before the SYN case first takes free entries
            for c in self.cases:
                if c.prime:
                    self.in_namespace(c, self.direct, c)

        self.open(load)

    def load_resident(self, code: Code) -> None:
        """The balancer of the populated cases, with its RESIDENT flows made by their
        first packets, ACKs (the spread case's frame): each writes its entry into the
        connection table, confirmed, in every build, where SYNs would take each other's
        slots of a SYN table."""
        lb = self.lbs["resident"] = Balancer(self.resident_capacity, add_vips, code)
        fails: list[str] = []
        spread = next(c for c in build_cases(code.syn_table) if c.name == "spread")
        self.seed(lb, spread.frame, VARY4, 0, RESIDENT, fails)  # in flow-number order
        if fails:
            raise L4lbError(f"{code.label}: the resident flows: {'; '.join(fails)}")
        if ctmap.count(lb.table_for(spread.frame)) != RESIDENT:
            raise L4lbError(f"{code.label}: {RESIDENT} resident flows asked, the table "
                            "holds another number")

    def load_fib(self, code: Code) -> None:
        """The balancer of the fib cases: the same VIPs in next_hop fib, and the
        namespace whose routes send the backends (198.18.2.0/26) via R1 on lb0,
        the ingress interface: XDP_TX, as the static gateway's packets."""
        from l4lb.testbed import FibNet  # noqa: PLC0415

        self.fibnet = FibNet()
        lb = self.lbs["fib"] = Balancer(self.capacity, add_vips, code)
        lb.dp.write_config(code.dataplane.RuntimeConfig(
            gateway_mac=GW_MAC, new_flow_rate=0, icmp_rate=ICMP_RATE_UNLIMITED, next_hop="fib"))
        self.fibnet.node.run(lb.dp.set_tx_ports, [self.fibnet.lb0])

    def case(self, name: str) -> Case:
        for c in self.cases:
            if c.name == name:
                return c
        raise KeyError(name)


# ---- summaries ---------------------------------------------------------------------------------

def summarize(results: dict[str, list[RoundResult]]) -> dict:
    """Each case's cost (see balancer.cost_summary) and the ratios of the targets."""
    drop = [r.ns for r in results["drop_direct"]]
    summary = {name: cost_summary(rounds, drop) for name, rounds in results.items()}

    def ratio(a: dict, b: dict) -> dict:
        return {k: (a[k] / b[k] if b[k] else None) for k in ("min", "median")}

    def net_and_gross(a: str, b: str) -> dict:
        return {"net": ratio(summary[a]["net_ns"], summary[b]["net_ns"]),
                "gross": ratio(summary[a]["gross_ns"], summary[b]["gross_ns"])}

    ratios = {
        "established / encap": net_and_gross("established", "encap"),
        "syn / encap": net_and_gross("syn", "encap"),
        "pass / drop": {"gross": ratio(summary["pass_direct"]["ns"],
                                       summary["drop_direct"]["ns"]),
                        "gross_via_harness": ratio(summary["pass"]["gross_ns"],
                                                   summary["drop_direct"]["ns"])},
    }
    if "syn_evict" in summary:
        ratios["syn_evict / encap"] = net_and_gross("syn_evict", "encap")
    if "established_fib" in summary:
        ratios["established_fib / established"] = net_and_gross("established_fib", "established")
    for gue, ipip in (("gue", "established"), ("gue6", "v6")):  # measured in the same rounds
        if gue in summary and ipip in summary:
            ratios[f"{gue} / {ipip}"] = net_and_gross(gue, ipip)
    for name, r in ratios.items():
        r["target"] = TARGETS[name]
    return {"cases": summary, "ratios": ratios}


# ---- the command -------------------------------------------------------------------------------

def _fmt(v, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}"


def render(console, report: dict) -> None:
    s = report["summary"]["cases"]
    t = table(f"per-packet cost, ns (repeat {report['settings']['repeat']:,}, "
              f"{report['settings']['rounds']} rounds; net = minus the harness -> XDP_DROP)",
              [("case", "left"), ("path proven per run", "left"), "harness", "net min",
               "net median", "gross median"])
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

    r = table("ratios (from the min / the median over rounds)",
              [("ratio", "left"), "net", "gross", "target", "median meets it"])
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


def run(repeat: int, rounds: int, out: Path | None, cpu: int | None = None,
        console=None, bench: PktCost | None = None, full_table: bool = True,
        loaded: Loaded | None = None) -> dict:
    """Measures every case for `rounds` rounds, shows the tables, writes the JSON
    (and a PNG beside it). With `bench` given, uses it and leaves it open; otherwise
    loads its own (with `loaded`, its harness), with the full-table case if full_table."""
    from rich.console import Console  # noqa: PLC0415

    console = console or Console()
    started = time.time()
    owned = bench is None
    if owned:
        harness = loaded.harness if loaded else None
        console.print(f"loading {'two balancers' if full_table else 'a balancer'} (connection "
                      f"tables with room for {repeat:,} new entries per round"
                      f"{'; one is then filled' if full_table else ''})"
                      f"{'' if harness else ' and the harness'}")
        bench = PktCost(repeat, cpu, full_table=full_table, harness=harness)
        console.print(f"pinned to CPU {bench.cpu}; ready in {time.time() - started:.1f} s")
    repeat = bench.repeat
    results: dict[str, list[RoundResult]] = {c.name: [] for c in bench.cases}
    try:
        with progress(console) as prog:
            task = prog.add_task("measuring", total=rounds * len(bench.cases))
            for rnd in range(1, rounds + 1):
                for case in bench.cases:
                    prog.update(task, description=f"round {rnd}/{rounds}: {case.name}")
                    rr = bench.measure(case, rnd)
                    results[case.name].append(rr)
                    verdicts = " ".join(f"{k}={v:,}" for k, v in rr.verdicts.items())
                    timing = (f"net {rr.net_ns:4d} ns (harness {rr.harness_ns} ns)"
                              if rr.net_ns is not None else f"direct {rr.ns:4d} ns")
                    status = "[green]ok[/green]" if not rr.failures else \
                        "[red]FAILED: " + "; ".join(rr.failures) + "[/red]"
                    prog.console.print(f"round {rnd} {case.name:12s} {timing:32s} "
                                       f"{verdicts:18s} {status}")
                    prog.advance(task)
    finally:
        if owned:
            bench.close()

    failures = [f"{r.case} round {r.round}: {f}" for rs in results.values() for r in rs
                for f in r.failures]
    report = {
        "benchmark": "pktcost",
        "date": utc_now(),
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
    finish_report(console, report, out, render)
    if out and _plot(report, out.with_suffix(".png")):
        console.print(f"wrote {out.with_suffix('.png')}")
    return report


# ---- A/B: the working tree against another commit ----------------------------------------------

AB_TARGETS = {  # new / old, docs: performance targets; the other cases are shown without one
    "syn": 0.5, "syn6": 0.5, "syn_resident": 0.5, "spread": 0.65,
    "established": 1.05, "udp": 1.05, "pass": 1.05,
}


def ab_summary(new: dict[str, list[RoundResult]], old: dict[str, list[RoundResult]]) -> dict:
    """Per case the ratio new / old of the net and gross costs, taken within each round
    (the two builds ran side by side in it): min, median and max over rounds."""
    drop_new = [r.ns for r in new["drop_direct"]]
    drop_old = [r.ns for r in old["drop_direct"]]
    out = {}
    for name in new:
        if new[name][0].net_ns is None:
            continue
        net = [a.net_ns / b.net_ns for a, b in zip(new[name], old[name]) if b.net_ns > 0]
        gross = [(a.net_ns + da) / (b.net_ns + db) for a, b, da, db in
                 zip(new[name], old[name], drop_new, drop_old)]
        out[name] = {"new": cost_summary(new[name], drop_new),
                     "old": cost_summary(old[name], drop_old),
                     "net": _spread(net), "gross": _spread(gross),
                     "target": AB_TARGETS.get(name)}
    return out


def _spread(values: list[float]) -> dict:
    values = sorted(values)
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": values[0], "median": statistics.median(values), "max": values[-1]}


def render_ab(console, report: dict) -> None:
    s = report["settings"]
    t = table(f"{s['new']} against {s['old']}: net ns and the ratio new / old per round "
              f"(repeat {s['repeat']:,}, {s['rounds']} rounds, interleaved)",
              [("case", "left"), "new net med", "old net med", "net ratio min / med / max",
               "gross ratio min / med / max", "target", "median meets it"])
    for name, c in report["ab"].items():
        tgt = c["target"]
        meets = "-" if tgt is None else ", ".join(
            f"{k}: {'yes' if c[k]['median'] is not None and c[k]['median'] <= tgt else 'NO'}"
            for k in ("net", "gross"))
        t.add_row(name, _fmt(c["new"]["net_ns"]["median"]), _fmt(c["old"]["net_ns"]["median"]),
                  " / ".join(_fmt(c["net"][k], 2) for k in ("min", "median", "max")),
                  " / ".join(_fmt(c["gross"][k], 2) for k in ("min", "median", "max")),
                  "-" if tgt is None else f"<= {tgt:g}", meets)
    console.print(t)
    console.print("[dim]net: beyond the harness -> XDP_DROP; gross: net + a plain XDP_DROP "
                  "program run directly (each build's own round).[/dim]")


def run_ab(against: str, repeat: int, rounds: int, out: Path | None, cpu: int | None = None,
           console=None, full_table: bool = True, only: frozenset[str] = frozenset()) -> dict:
    """Both builds through one harness, case by case, round by round: in each round every
    case runs on the working tree's program and on the other commit's, in alternating
    order, with every proof of run() for both."""
    from rich.console import Console  # noqa: PLC0415

    console = console or Console()
    started = time.time()
    ref = RefCode(against)
    benches: list[PktCost] = []
    try:
        console.print(f"loading the working tree's balancers and those of {ref.code.label}")
        benches.append(PktCost(repeat, cpu, full_table=full_table, only=only))
        benches.append(PktCost(repeat, cpu, full_table=full_table, harness=benches[0].harness,
                               code=ref.code, only=only))
        console.print(f"pinned to CPU {benches[0].cpu}; ready in {time.time() - started:.1f} s")
        results = [{c.name: [] for c in b.cases} for b in benches]
        # the cases both builds have (one without GUE has no GUE cases, one without
        # next_hop fib no fib case)
        cases = [c for c in benches[0].cases if c.name in results[1]]
        results[0] = {c.name: results[0][c.name] for c in cases}
        with progress(console) as prog:
            task = prog.add_task("measuring", total=rounds * len(cases) * 2)
            for rnd in range(1, rounds + 1):
                for case in cases:
                    order = (0, 1) if (rnd + len(results[0][case.name])) % 2 else (1, 0)
                    for side in order:
                        b = benches[side]
                        prog.update(task, description=f"round {rnd}/{rounds}: {case.name} "
                                                      f"({b.code.label})")
                        rr = b.measure(b.case(case.name), rnd)
                        results[side][case.name].append(rr)
                        prog.advance(task)
                    a, o = results[0][case.name][-1], results[1][case.name][-1]
                    status = "[green]ok[/green]" if not (a.failures or o.failures) else \
                        "[red]FAILED: " + "; ".join(a.failures + o.failures) + "[/red]"
                    if a.net_ns is not None:
                        timing = f"net {a.net_ns:4d} / {o.net_ns:4d} ns"
                    else:
                        timing = f"direct {a.ns:4d} / {o.ns:4d} ns"
                    prog.console.print(f"round {rnd} {case.name:13s} {timing:26s} {status}")
    finally:
        for b in reversed(benches):
            b.close()
        ref.close()

    failures = [f"{label} {r.case} round {r.round}: {f}"
                for label, res in (("new", results[0]), ("old", results[1]))
                for rs in res.values() for r in rs for f in r.failures]
    report = {
        "benchmark": "pktcost-ab",
        "date": utc_now(),
        "duration_s": round(time.time() - started, 1),
        "machine": machine(),
        "settings": {"repeat": repeat, "rounds": rounds, "cpu": benches[0].cpu,
                     "new": "working tree", "old": ref.code.label, "old_commit": ref.commit,
                     "resident_flows": RESIDENT},
        "cases": [{"name": c.name, "title": c.title,
                   "rounds_new": [asdict(r) for r in results[0][c.name]],
                   "rounds_old": [asdict(r) for r in results[1][c.name]]} for c in cases],
        "ab": ab_summary(results[0], results[1]),
        "ok": not failures,
        "failures": failures,
    }
    finish_report(console, report, out, render_ab)
    return report


def _plot(report: dict, path: Path) -> bool:
    """The per-packet cost plot of bench.run, for this report alone; False without
    matplotlib."""
    try:
        from . import plots  # noqa: PLC0415
    except ImportError:
        return False
    plots.plot_pktcost({"pktcost": report, "machine": report["machine"]}, path)
    return True


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
    ap.add_argument("--against", metavar="REF",
                    help="also build the program of git commit REF and report, per case, "
                         "the ratio working tree / REF (interleaved rounds, one harness)")
    ap.add_argument("--cases", default="",
                    help="comma-separated names of the cases to measure with --against "
                         "(default: all)")
    args = ap.parse_args(argv)
    only = frozenset(filter(None, args.cases.split(",")))
    repeat = args.repeat or (QUICK_REPEAT if args.quick else DEFAULT_REPEAT)
    if repeat < 2 or args.rounds < 1:
        ap.error("--repeat must be at least 2 and --rounds at least 1")
    if args.against:
        out = args.out if args.out != DEFAULT_OUT else RESULTS_DIR / "pktcost-ab.json"
        return run_command("bench.pktcost", lambda: run_ab(args.against, repeat, args.rounds,
                                                           out, args.cpu, only=only))
    return run_command("bench.pktcost", lambda: run(repeat, args.rounds, args.out, args.cpu))


if __name__ == "__main__":
    sys.exit(main())
