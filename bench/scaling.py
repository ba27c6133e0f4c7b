"""How the per-packet cost grows with the balancer's tables, with BPF_PROG_TEST_RUN.

    .venv/bin/python -m bench.scaling [--quick] [--rounds N] [--repeat N] [--out PATH]

Three dimensions, each point against the dimension's smallest point:
  backends   one VIP whose ring is filled with 1, 16, 256 or 4096 distinct backends
             (the ring is read back from the kernel: it names that many backends);
  vips       1, 8, 64 or 512 VIPs in the maps (each with 8 backends of its own,
             4096 backends in all); the packets go to one of them;
  conntrack  the connection table holding only the measured flows, or full
             (every insert evicts; a build with a SYN table: that is full too, and
             every SYN takes another's slot).
The program is compiled once for all points with the largest capacity
(512 VIPs, 4096 backends, rings of 65537), so the maps are the same size
throughout and only what they hold changes.

Three packets per point, all to the same VIP (198.18.10.10:80/tcp):
  established         one flow whose entry exists: every run the same hit;
  established_spread  `repeat` flows whose entries were made just before by
                      their first packets (untimed ACKs, which write the
                      connection table in every build): every run hits a
                      different entry, and, over a ring of N backends, reads a
                      different backend;
  syn                 every run a new flow: VIP lookup, a pick at a random slot
                      of the ring, a connection-table insert (a build with a
                      SYN table: into its SYN table).

The method is bench.pktcost's, with its classes: the harness puts the frame back
before every run and tail-calls the balancer; the harness alone (tail-calling
XDP_DROP) is timed right before and after on the same frame and the lower is
subtracted (net); gross = net + a plain XDP_DROP program run directly, timed
in every round. After every timed run the path is proven: the balancer's
counters moved by exactly `repeat` on the expected path and by 0 elsewhere,
the VIP's packet counter by `repeat`, the harness ran `repeat` times and undid
every encapsulation, the last run's output equals a direct run on its packet;
SYN runs left one new entry each (less those that later SYNs of the round gave
up: ct_evict, ct_syn_evict), spread runs hit `repeat` distinct entries.

Every round visits every point (in order in odd rounds, in reverse in even
ones, so that a slow drift of the machine does not look like growth). Two
ratios to the smallest point: `min`, of the fastest rounds (noise on a shared
machine only ever adds time, so the fastest round is the best estimate of the
cost; the flatness verdict uses it), and `median`, over rounds of the ratio
taken within each round."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from l4lb import consts
from l4lb.errors import L4lbError
from l4lb.libbpf import XDP_TX
from l4lb.model import VipKey, VipSpec

from . import ctmap
from .balancer import (EVICTS, VARY4, Balancer, Case, Loaded, Measurer, RoundResult, cost_summary,
                       drop_case, tcp4_frame)
from .common import (CLIENT4, RESULTS_DIR, VIP4, finish_report, machine, minmed, pool,
                     possible_cpus, progress, run_command, table, utc_now)
from .harness import Harness

DEFAULT_REPEAT = 300_000
QUICK_REPEAT = 50_000
DEFAULT_ROUNDS = 7
QUICK_ROUNDS = 3
DEFAULT_OUT = RESULTS_DIR / "scaling.json"

BACKEND_POINTS = (1, 16, 256, 4096)
VIP_POINTS = (1, 8, 64, 512)
CT_POINTS = ("empty", "full")
DIMENSIONS = {"backends": BACKEND_POINTS, "vips": VIP_POINTS, "conntrack": CT_POINTS}
KINDS = ("established", "established_spread", "syn")
FLAT = 0.10  # the target: every point within ±10% of the smallest
CAPACITY_VIPS = 512
CAPACITY_BACKENDS = 4096
BACKENDS_PER_VIP = 8  # on every VIP of the vips dimension

# the measured VIP; the other VIPs of the vips dimension take 198.18.10.1-128 on four ports;
# 4096 backends do not fit the plan's 198.18.2.0/24: their addresses are common.pool()'s
MEASURED = VipKey.parse(VIP4, 80, "tcp")
OTHER_PORTS = (80, 443, 8080, 8443)
# clients: the harness varies the source port (low 16 bits of the flow number) and the
# last 16-bit word of the source address (high bits); every varied flow starts from
# 198.18.0.5:40000, so one flow counter makes them all distinct. The single established
# flow comes from 198.18.0.4, a word the varied flows never reach.
CLIENT_VARIED = CLIENT4
CLIENT_FIXED = "198.18.0.4"


def other_vips(n: int) -> list[VipSpec]:
    """The VIPs that join the measured one, each with BACKENDS_PER_VIP backends of its own
    (the pool after the measured VIP's own: 4096 backends in all with 512 VIPs)."""
    keys = []
    for i in range(1, 129):
        for port in OTHER_PORTS:
            key = VipKey.parse(f"198.18.10.{i}", port, "tcp")
            if key != MEASURED:
                keys.append(key)
    if n > len(keys):
        raise L4lbError(f"{n} other VIPs asked, the benchmark names {len(keys)}")
    return [VipSpec(k, frozenset(), {a: 1 for a in pool(BACKENDS_PER_VIP,
                                                         (i + 1) * BACKENDS_PER_VIP)})
            for i, k in enumerate(keys[:n])]


def build_kinds(full: bool) -> dict[str, Case]:
    """The three packets of a point, on the balancer with the full table or the other."""
    tag = " (full table)" if full else ""
    return {
        "established": Case("established", "TCP established, one flow, 4in4" + tag,
                            tcp4_frame(CLIENT_FIXED, VIP4, "A", 40001), "lb", XDP_TX,
                            ("tx", "ct_hit"), 20, MEASURED, prime=True, fill_table=full),
        "established_spread": Case("established_spread",
                                   "TCP established, every run another flow, 4in4" + tag,
                                   tcp4_frame(CLIENT_VARIED, VIP4, "A", 40000), "lb", XDP_TX,
                                   ("tx", "ct_hit"), 20, MEASURED, vary=VARY4, fill_table=full),
        "syn": Case("syn", "TCP SYN, a new entry per run, 4in4" + tag,
                    tcp4_frame(CLIENT_VARIED, VIP4, "S", 40000), "lb", XDP_TX,
                    ("tx", "ct_miss", "ct_insert"), 20, MEASURED, vary=VARY4, fill_table=full,
                    may_move=EVICTS),
    }


# the plain XDP_DROP program, on the frame bench.pktcost times it with
DROP_CASE = drop_case(tcp4_frame(CLIENT4, VIP4, "A", 40001))


def _setup(state) -> None:
    state.add_vip(VipSpec(MEASURED, frozenset(), {b: 1 for b in pool(BACKENDS_PER_VIP)}))


def capacity_for(repeat: int, ncpus: int | None = None) -> consts.Capacity:
    """The balancers' capacity: the largest points, and a connection table whose share per
    CPU takes one round's spread or SYN flows twice over (so that spread flows inserted into
    the full table are never the ones evicted)."""
    ncpus = ncpus or possible_cpus()
    ct = max(consts.DEFAULT_CT_SIZE, 2 * (repeat + 1024) * ncpus)
    return consts.Capacity(max_vips=CAPACITY_VIPS, max_backends=CAPACITY_BACKENDS, ct_size=ct,
                           ring_size=consts.DEFAULT_RING_SIZE)


def new_balancer(capacity: consts.Capacity) -> Balancer:
    """A balancer for this benchmark: the measured VIP alone, with its 8 backends."""
    return Balancer(capacity, _setup)


class Scaling(Measurer):
    """The balancers at the largest capacity, the harness, and the points.
    `main` serves every point but the full table; `full` is filled once and
    stays full. With shared_table=True one balancer serves both: the full-table
    points then come after every other point (the fill cannot be undone)."""

    def __init__(self, repeat: int, cpu: int | None = None, harness: Harness | None = None,
                 shared_table: bool = False, balancer: Balancer | None = None):
        """harness, balancer: already loaded ones to use (left open on close()); a balancer
        given must come from new_balancer() and implies shared_table."""
        super().__init__(repeat, cpu, harness)
        self.capacity = balancer.capacity if balancer else capacity_for(repeat, self.ncpus)
        self.share = self.capacity.ct_size // self.ncpus
        if self.share < 2 * (repeat + 1024):
            self.close()
            raise L4lbError(f"a connection table of {self.capacity.ct_size} entries is too small "
                            f"for repeat {repeat}: use capacity_for({repeat})")
        self.shared_table = shared_table or balancer is not None
        self.kinds = {False: build_kinds(False), True: build_kinds(True)}
        self.drop_case = DROP_CASE
        self.cases = [self.drop_case]
        self.others: list[VipSpec] = other_vips(CAPACITY_VIPS - 1)
        self.n_others = 0
        self.filled = False
        self._own_lbs = balancer is None

        def load():
            self.lbs["main"] = balancer or new_balancer(self.capacity)
            self.lbs["full"] = self.lbs["main"] if self.shared_table else \
                new_balancer(self.capacity)
            if not self.shared_table:
                self.fill()

        self.open(load)

    # ---- the points -------------------------------------------------------------------------
    def fill(self) -> None:
        """Fills the `full` balancer's table (on this CPU) until every insert evicts."""
        self.fill_conntrack(self.lbs["full"], self.kinds[True]["syn"])
        self.filled = True

    def set_backends(self, n: int) -> dict:
        """The measured VIP's backends: the first n of the pool (each set holds the
        smaller ones, so that 4096 never needs more than 4096 backend indices)."""
        lb = self.lbs["main"]
        lb.state.set_backends(MEASURED, {a: 1 for a in pool(n)})
        vip = lb.state.vips[MEASURED]
        ring = lb.dp.ring(vip.vip_id, vip.ring)
        distinct = int(np.unique(ring[ring != 0]).size)
        if distinct != n:
            raise L4lbError(f"the ring of {MEASURED} names {distinct} backends, {n} expected")
        return {"backends": n, "ring_distinct_backends": distinct,
                "ring_size": int(ring.size)}

    def set_vips(self, n: int) -> dict:
        lb = self.lbs["main"]
        want = n - 1
        while self.n_others < want:
            lb.state.add_vip(self.others[self.n_others])
            self.n_others += 1
        while self.n_others > want:
            self.n_others -= 1
            lb.state.delete_vip(self.others[self.n_others].key)
        in_map = ctmap.count(lb.prog.table(consts.MAP_VIPS))
        if in_map != n:
            raise L4lbError(f"the VIP map holds {in_map} VIPs, {n} expected")
        return {"vips": n, "vips_in_map": in_map,
                "backends_in_use": len(lb.state.backends)}

    def reset(self, keep_vips: bool = False) -> None:
        """Between dimensions: the measured VIP with its usual backends, alone unless
        keep_vips (the vips dimension sets the number of VIPs itself)."""
        if not keep_vips:
            self.set_vips(1)
        self.set_backends(BACKENDS_PER_VIP)

    def point_info(self, dim: str, point) -> dict:
        if dim == "backends":
            return self.set_backends(point)
        if dim == "vips":
            return self.set_vips(point)
        lb = self.lbs["full" if point == "full" else "main"]
        if point == "full" and not self.filled:
            self.fill()
        return {"table": point, "entries": ctmap.count(lb.conntrack),
                "capacity": self.capacity.ct_size, "share_of_this_cpu": self.share}

    def kinds_for(self, dim: str, point) -> dict[str, Case]:
        return self.kinds[dim == "conntrack" and point == "full"]

    def measure_kind(self, case: Case, round_no: int) -> RoundResult:
        if case.name == "established_spread":
            return self.measure_spread(case, round_no, seeded=True)
        return self.measure(case, round_no)


# ---- summaries ----------------------------------------------------------------------------------

def summarize(results: dict, drop: list[int]) -> dict:
    """results[dim][point][kind] = [RoundResult per round]; drop = XDP_DROP per round."""
    out: dict = {"points": {}, "ratios": {}, "flat": {}}
    for dim, points in results.items():
        pts = list(points)
        base = pts[0]
        out["points"][dim] = {}
        out["ratios"][dim] = {}
        for point in pts:
            s = {kind: cost_summary(rounds, drop) for kind, rounds in points[point].items()}
            out["points"][dim][str(point)] = s
        for point in pts:
            r = {}
            for kind in points[point]:
                cur, ref = points[point][kind], points[base][kind]
                pn, bn = out["points"][dim][str(point)][kind], out["points"][dim][str(base)][kind]
                r[kind] = {
                    "net": {"min": pn["net_ns"]["min"] / bn["net_ns"]["min"],
                            "median": statistics.median(
                                a.net_ns / b.net_ns for a, b in zip(cur, ref))},
                    "gross": {"min": pn["gross_ns"]["min"] / bn["gross_ns"]["min"],
                              "median": statistics.median(
                                  (a.net_ns + d) / (b.net_ns + d)
                                  for a, b, d in zip(cur, ref, drop))},
                }
            out["ratios"][dim][str(point)] = r
        if dim == "conntrack":
            continue  # no flatness target: a full table is expected to cost more
        flat = {}
        for kind in KINDS:
            worst = {m: {est: max(abs(out["ratios"][dim][str(p)][kind][m][est] - 1) for p in pts)
                         for est in ("min", "median")} for m in ("net", "gross")}
            flat[kind] = {"largest_deviation": worst,
                          "within_10pct": {m: {est: w <= FLAT for est, w in worst[m].items()}
                                           for m in worst}}
        out["flat"][dim] = flat
    out["drop_ns"] = minmed(drop)
    return out


# ---- the command --------------------------------------------------------------------------------

def render(console, report: dict) -> None:
    s = report["summary"]
    for dim, points in s["points"].items():
        t = table(f"{dim}: net ns per packet, median (fastest), and the ratio to "
                  f"{next(iter(points))} (fastest / median)", (dim, *KINDS))
        for point, kinds in points.items():
            row = [point]
            for kind in KINDS:
                n = kinds[kind]["net_ns"]
                ratio = s["ratios"][dim][point][kind]["net"]
                row.append(f"{n['median']:.0f} ({n['min']:.0f})  "
                           f"x{ratio['min']:.2f} / x{ratio['median']:.2f}")
            t.add_row(*row)
        console.print(t)
        if dim in s["flat"]:
            verdicts = []
            for kind, f in s["flat"][dim].items():
                dev = f["largest_deviation"]["net"]
                ok = f["within_10pct"]["net"]["min"]
                verdicts.append(f"{kind} ±{dev['min'] * 100:.1f}% ({'yes' if ok else 'NO'}; "
                                f"median of rounds ±{dev['median'] * 100:.1f}%)")
            console.print(f"flat within ±10% over {dim}, net, from the fastest rounds: "
                          + "; ".join(verdicts))


def run(repeat: int, rounds: int, out: Path | None, cpu: int | None = None, console=None,
        shared_table: bool = False, loaded: Loaded | None = None) -> dict:
    """Measures every point for `rounds` rounds; shows the tables; writes the JSON if `out`.
    loaded: programs shared with other parts: its harness is used, and with shared_table
    its balancer (loaded here if it has none, and left there for the parts after this)."""
    from rich.console import Console  # noqa: PLC0415

    console = console or Console()
    started = time.time()
    balancer = None
    if loaded is not None and shared_table:
        if loaded.balancer is None:
            console.print("scaling: loading one balancer (512 VIPs, 4096 backends), kept for "
                          "the parts after this one")
            loaded.balancer = new_balancer(capacity_for(repeat))
        balancer = loaded.balancer
    else:
        console.print("scaling: loading the balancer"
                      f"{'' if shared_table else 's'} (512 VIPs, 4096 backends)"
                      f"{'' if shared_table else ' and filling one connection table'}")
    harness = loaded.harness if loaded is not None else None
    bench = Scaling(repeat, cpu, harness=harness, shared_table=shared_table, balancer=balancer)
    console.print(f"scaling: pinned to CPU {bench.cpu}; ready in {time.time() - started:.1f} s")
    results = {dim: {p: {k: [] for k in KINDS} for p in pts} for dim, pts in DIMENSIONS.items()}
    info: dict = {dim: {str(p): [] for p in pts} for dim, pts in DIMENSIONS.items()}
    drop: list[int] = []
    failures: list[str] = []
    # one balancer: the full-table points wait until every other point is done
    phases = [[("backends", p) for p in BACKEND_POINTS] + [("conntrack", p) for p in CT_POINTS] +
              [("vips", p) for p in VIP_POINTS]]
    if shared_table:
        phases = [[x for x in phases[0] if x != ("conntrack", "full")], [("conntrack", "full")]]
    total = rounds * (sum(len(ph) for ph in phases) * len(KINDS) + len(phases))
    try:
        with progress(console) as prog:
            task = prog.add_task("scaling", total=total)
            for phase in phases:
                for rnd in range(1, rounds + 1):
                    order = _round_order(phase, rnd)
                    prog.update(task, description=f"scaling round {rnd}/{rounds}: XDP_DROP")
                    d = bench.measure(bench.drop_case, rnd)
                    failures += [f"drop round {rnd}: {f}" for f in d.failures]
                    if phase is phases[0]:
                        drop.append(d.ns)
                    prog.advance(task)
                    prev = None
                    for dim, point in order:
                        prog.update(task, description=f"scaling round {rnd}/{rounds}: "
                                                      f"{dim} {point}")
                        if dim != prev:  # each dimension starts from 8 backends (and one VIP)
                            bench.reset(keep_vips=dim == "vips")
                            prev = dim
                        info[dim][str(point)].append(bench.point_info(dim, point))
                        line = []
                        for kind, case in bench.kinds_for(dim, point).items():
                            rr = bench.measure_kind(case, rnd)
                            results[dim][point][kind].append(rr)
                            failures += [f"{dim} {point} {kind} round {rnd}: {f}"
                                         for f in rr.failures]
                            line.append(f"{kind} {rr.net_ns:4d}" +
                                        ("" if not rr.failures else " [red]FAILED[/red]"))
                            prog.advance(task)
                        prog.console.print(f"round {rnd} {dim:9s} {point!s:>5s}: "
                                           + ", ".join(line) + " ns net")
    finally:
        bench.close()
    report = {
        "benchmark": "scaling",
        "date": utc_now(),
        "duration_s": round(time.time() - started, 1),
        "machine": machine(),
        "settings": {"repeat": bench.repeat, "rounds": rounds, "cpu": bench.cpu,
                     "capacity": asdict(bench.capacity), "ct_share_per_cpu": bench.share,
                     "shared_table": shared_table, "measured_vip": str(MEASURED),
                     "backend_pool": "198.18.32.0/19", "backends_per_other_vip": BACKENDS_PER_VIP,
                     "points": {d: list(p) for d, p in DIMENSIONS.items()}},
        "method": __doc__.split("\n\n", 2)[2].strip(),
        "target": "flat within ±10% from 1 to 4096 backends and from 1 to 512 VIPs",
        "point_state": info,
        "rounds": {dim: {str(p): {k: [asdict(r) for r in rs] for k, rs in kinds.items()}
                         for p, kinds in pts.items()} for dim, pts in results.items()},
        "drop_direct_ns": drop,
        "summary": summarize(results, drop),
        "ok": not failures,
        "failures": failures,
    }
    finish_report(console, report, out, render)
    return report


def _round_order(phase: list, rnd: int) -> list:
    """The phase's points in order in odd rounds, in reverse in even ones: each point is
    measured early in one round and late in the next, and the vips dimension, last in odd
    rounds, ends on 512 VIPs where the next round starts it (the adds, ~2 ms each, are
    made once per two rounds)."""
    return list(phase) if rnd % 2 else list(phase)[::-1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scaling",
                                 description="Per-packet cost against the number of backends, "
                                             "of VIPs, and a full connection table.")
    ap.add_argument("--quick", action="store_true",
                    help=f"repeat {QUICK_REPEAT:,}, {QUICK_ROUNDS} rounds, one balancer")
    ap.add_argument("--repeat", type=int, help="runs per case and round")
    ap.add_argument("--rounds", type=int, help=f"rounds (default {DEFAULT_ROUNDS})")
    ap.add_argument("--shared-table", action="store_true",
                    help="one balancer: the full-table points after all others (saves a compile)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="JSON results (default bench/results/scaling.json)")
    ap.add_argument("--cpu", type=int, help="CPU to run on (default: the last one allowed)")
    args = ap.parse_args(argv)
    repeat = args.repeat or (QUICK_REPEAT if args.quick else DEFAULT_REPEAT)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    if repeat < 2 or rounds < 1:
        ap.error("--repeat must be at least 2 and --rounds at least 1")
    return run_command("bench.scaling", lambda: run(repeat, rounds, args.out, args.cpu,
                                                    shared_table=args.shared_table or args.quick))


if __name__ == "__main__":
    sys.exit(main())
