"""The balancer under measurement: loaded with the benchmark's configuration,
the packets sent to it, and one case timed through the harness with its path
proven (bench.pktcost and bench.scaling measure this way; the method is in
bench/pktcost.py's notes)."""
from __future__ import annotations

import ctypes
import os
import statistics
from dataclasses import asdict, dataclass, field

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from l4lb import consts, libbpf
from l4lb.conntrack import key_hash
from l4lb.errors import L4lbError
from l4lb.libbpf import XDP_DROP, XDP_TX
from l4lb.model import VipKey

from . import ctmap
from .common import CLIENT_MAC, GW_MAC, LB_MAC, minmed, pin_to_cpu, possible_cpus
from .harness import Harness, HarnessCounts, Timing, Vary, time_run
from .ref import Code, worktree

WORKTREE = worktree()

ICMP_RATE_UNLIMITED = 0xFFFFFFFF
EVICT_SLACK = 16  # entries a full LRU table may gain or lose: evictions come in small batches
# counters of the flows a round of new flows may give up for later ones: a way of a pair of
# full buckets (ct_evict), a slot of the SYN table that a later SYN took (ct_syn_evict)
EVICTS = ("ct_evict", "ct_syn_evict")

# verdict paths of balancer.c: every path moves exactly one of these counters
VERDICT_COUNTERS = {
    "TX": ("tx", "too_big", "icmp_echo"),
    "PASS": ("pass", "fib_no_neigh"),
    "DROP": ("no_backend", "icmp_limited", "error", "fragment", "ext_header", "malformed", "fib_drop"),
}


# ---- the packets ----------------------------------------------------------------------------------

def eth():
    return Ether(src=CLIENT_MAC, dst=LB_MAC)


def tcp(flags: str, sport: int, dport: int = 80):
    """A client's SYN ("S", with the options of a Linux client) or ACK ("A") to `dport`."""
    if flags == "S":
        return TCP(sport=sport, dport=dport, flags="S", seq=1000, window=64240,
                   options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1000, 0)),
                            ("NOP", None), ("WScale", 7)])
    return TCP(sport=sport, dport=dport, flags="A", seq=1001, ack=5001, window=502,
               options=[("NOP", None), ("NOP", None), ("Timestamp", (2000, 1000))])


def tcp4_frame(src: str, dst: str, flags: str, sport: int) -> bytes:
    return bytes(eth() / IP(src=src, dst=dst, flags="DF", ttl=64) / tcp(flags, sport))


def with_tcp(frame: bytes, flags: str) -> bytes:
    """The same flow's packet with the TCP header of tcp(flags) (the client's SYN or
    ACK), lengths and checksums made again. The varied fields keep their offsets (the
    IP header is the same; the TCP options come after them)."""
    pkt = Ether(frame)
    ip = pkt[IP] if IP in pkt else pkt[IPv6]
    old = pkt[TCP]
    ip.remove_payload()
    for f in ("len", "chksum", "plen"):
        if f in ip.fields:
            delattr(ip, f)  # made again from the new payload
    return bytes(pkt / tcp(flags, old.sport, old.dport))


IP_OFF = 14
# an IPv4 TCP frame of tcp4_frame() made a new flow on every run
VARY4 = Vary(sport_off=IP_OFF + 20, addr_off=IP_OFF + 14, ipcsum_off=IP_OFF + 10,
             l4csum_off=IP_OFF + 20 + 16)


# ---- a case and one round of it ---------------------------------------------------------------

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
    resident: bool = False      # on the balancer whose table holds a resident population
    may_move: tuple[str, ...] = ()  # counters that may move by any amount (recorded): a table of
                                    # buckets gives up a flow, rarely, when a new flow's buckets are
                                    # full (ct_evict); SYNs of a round take each other's slots of a
                                    # SYN table (ct_syn_evict)
    after_syn: bool = False     # every run the first packet after its flow's SYN, sent untimed
                                # before it (Measurer.measure_after_syn)
    fib: bool = False           # on the balancer in next_hop fib, run in a namespace of routes
                                # (l4lb.testbed.FibNet) with its lb0 as the ingress interface
    encap: str = "ipip"         # the VIP's encapsulation: a build without GUE leaves "gue" cases out


def drop_case(frame: bytes) -> Case:
    """The plain XDP_DROP program run directly: the fixed cost every XDP program pays."""
    return Case("drop_direct", "baseline: XDP_DROP, timed directly (no harness)", frame, "drop",
                XDP_DROP, harness=False)


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
    batches: int | None = None      # after_syn: the batches the round's runs went in
    reseeded: bool = False          # resident flows given up before the round were made again
    failures: list[str] = field(default_factory=list)


def _mean_timing(timings: list[Timing], runs: list[int]) -> Timing:
    """The timings of batches as one of all their runs: the means weighted by each
    batch's runs, and the last batch's result."""
    total = sum(runs)
    return Timing(round(sum(t.kernel_ns * n for t, n in zip(timings, runs)) / total),
                  sum(t.wall_ns * n for t, n in zip(timings, runs)) / total, timings[-1].result)


def cost_summary(rounds: list[RoundResult], drop: list[int]) -> dict:
    """One case's rounds, with drop = the plain XDP_DROP program's time in each round.
    min: from the fastest round of each series (case, harness alone, XDP_DROP), the best
    estimate on a machine whose noise only ever adds time; median: over rounds of the
    differences taken within each round, which pair measurements made seconds apart."""
    ns = [r.ns for r in rounds]
    s = {"ns": minmed(ns)}
    if rounds[0].net_ns is None:
        s["gross_ns"] = s["ns"]
        return s
    harness = [r.harness_ns for r in rounds]
    s["harness_ns"] = minmed(harness)
    net_min = min(ns) - min(harness)
    s["net_ns"] = {"min": net_min, "median": statistics.median(r.net_ns for r in rounds)}
    s["gross_ns"] = {"min": net_min + min(drop),
                     "median": statistics.median(r.net_ns + d for r, d in zip(rounds, drop))}
    return s


# ---- the balancer ---------------------------------------------------------------------------------

class _OtherBuild:
    """The desired state of another build (bench.ref) as the benchmark's setups
    see it: VIP keys and specs of the working tree, turned into the build's own."""

    def __init__(self, state, code: Code):
        self._state, self._code = state, code

    def add_vip(self, spec):
        return self._state.add_vip(self._code.vip_spec(spec))

    def delete_vip(self, key):
        return self._state.delete_vip(self._code.vip_key(key))

    def set_backends(self, key, backends):
        return self._state.set_backends(self._code.vip_key(key), backends)

    def __getattr__(self, name):
        return getattr(self._state, name)


class Balancer:
    """One loaded balancer with the benchmark's configuration; `setup(state)`, when
    given, adds its VIPs. `code`: the build to load, the working tree's by default
    or another commit's (bench.ref), set up the same way through its own modules."""

    def __init__(self, capacity: consts.Capacity, setup=None, code: Code | None = None):
        code = code or WORKTREE
        self.code = code
        self.capacity = capacity
        cap = code.capacity(capacity)
        self.prog = code.bpf.load_balancer(cap)
        self.dp = code.dataplane.Dataplane(self.prog, cap)
        code.clear(self.dp)
        self.dp.write_config(code.dataplane.RuntimeConfig(
            gateway_mac=GW_MAC, new_flow_rate=0, icmp_rate=ICMP_RATE_UNLIMITED), portless_vips=0)
        self.lbstate = code.state.LbState(cap, self.dp)
        self.state = self.lbstate if code is WORKTREE else _OtherBuild(self.lbstate, code)
        if setup is not None:
            setup(self.state)
        self.dp.set_portless(self.lbstate.portless)
        # each build's own view of its tables (a hash map, or an array of buckets)
        self.conntrack = self.dp.conntrack_table(code.consts.FAMILY_V4)
        self.conntrack6 = self.dp.conntrack_table(code.consts.FAMILY_V6)

    def stats(self, vip: VipKey | None) -> tuple[dict[str, int], int]:
        packets = 0
        if vip:
            vip_id = self.lbstate.vips[self.code.vip_key(vip)].vip_id
            packets = self.dp.vip_stats(vip_id)["packets"]
        return self.dp.global_stats(), packets

    def table_for(self, frame: bytes):
        """The connection table of the frame's family."""
        return self.conntrack6 if frame[12:14] == b"\x86\xdd" else self.conntrack

    def close(self) -> None:
        self.prog.close()


class Loaded:
    """Programs that the parts of one run share, each loaded when first wanted
    (compiling a balancer takes 5-8 s): the harness, and a balancer that a part
    loads and leaves here for the parts after it."""

    def __init__(self):
        self._harness: Harness | None = None
        self.balancer: Balancer | None = None

    @property
    def harness(self) -> Harness:
        if self._harness is None:
            self._harness = Harness()
        return self._harness

    def close(self) -> None:
        if self.balancer is not None:
            self.balancer.close()
            self.balancer = None
        if self._harness is not None:
            self._harness.close()
            self._harness = None


# ---- measuring ------------------------------------------------------------------------------------

class Measurer:
    """The harness, the balancers (`lbs`: "main", and "full" for the cases on a full
    connection table) and this process pinned to one CPU: one case measured at a time,
    its path proven. A subclass loads the balancers (see open())."""

    def __init__(self, repeat: int, cpu: int | None, harness: Harness | None):
        """harness: one already loaded (it stays open on close()); by default its own."""
        if repeat < 2:
            raise L4lbError(f"repeat {repeat}: give at least 2 (the harness proves its restores "
                            "from the second run on)")
        self.repeat = repeat
        self.harness = harness
        self._own_harness = harness is None
        self._own_lbs = True
        self.lbs: dict[str, Balancer] = {}
        self.next_flow = 0
        # the after_syn cases' own series of flow numbers (their own client address): every
        # build of an A/B run times the same flows in the same batches
        self.next_flow_after_syn = 0
        self._affinity, self.cpu = pin_to_cpu(cpu)
        self.ncpus = possible_cpus()
        self.fibnet = None  # FibNet of the fib cases: made after pin_to_cpu, its thread inherits the CPU
        self.ifindex = 0  # the ingress interface of direct runs (the fib cases': lb0)

    def open(self, load) -> None:
        """Loads the harness (unless given) and then calls load(); closes all on failure."""
        try:
            if self.harness is None:
                self.harness = Harness()
            load()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._own_lbs:
            for lb in {id(lb): lb for lb in self.lbs.values()}.values():
                lb.close()
        self.lbs = {}
        if self.fibnet is not None:
            self.fibnet.close()
            self.fibnet = None
        if self.harness is not None and self._own_harness:
            self.harness.close()
        os.sched_setaffinity(0, self._affinity)

    def lb(self, case: Case) -> Balancer:
        return self.lbs["full" if case.fill_table else "resident" if case.resident else
                        "fib" if case.fib else "main"]

    def target_fd(self, case: Case) -> int:
        if case.target == "lb":
            return self.lb(case).prog.fd
        return {"encap": self.harness.encap.fd, "drop": self.harness.drop.fd}[case.target]

    def direct(self, case: Case, frame: bytes | None = None) -> libbpf.RunResult:
        """One run of the program under test on the frame, without the harness."""
        return libbpf.run(self.target_fd(case), frame if frame is not None else case.frame,
                          ifindex=self.ifindex)

    def through_harness(self, case: Case, repeat: int = 1,
                        frame: bytes | None = None) -> libbpf.RunResult:
        """`repeat` untimed runs through the harness (new flows if the case varies them),
        of the case's frame or of `frame` (another packet of the same flows)."""
        self.harness.load_frame(case.frame if frame is None else frame, case.vary, self.next_flow)
        r = self.harness.time(self.target_fd(case), repeat).result
        if case.vary:
            self.next_flow += repeat
        return r

    def fill_conntrack(self, lb: Balancer, case: Case) -> None:
        """Makes new flows until the table stops growing: from then on every new flow
        on this CPU replaces another. Each flow's first packet is an ACK (the case's
        flow, with_tcp): in every build it writes its entry into the connection table
        itself, confirmed, where a SYN's waits in the SYN table of a build that has one.
        That build's SYN table is then filled too, by SYNs, until every slot holds a
        flow (a flood of new flows: every SYN takes another's slot)."""
        ack = with_tcp(case.frame, "A")
        if hasattr(lb.conntrack, "remove_all"):
            # an array of buckets: full once every way holds a flow; from then on every
            # insert finds both its buckets full and replaces a flow (ct_evict)
            ways = lb.conntrack.buckets * lb.conntrack.ways
            for _ in range(200):
                if ctmap.count(lb.conntrack) == ways:
                    break
                self.through_harness(case, self.share, ack)
            else:
                raise L4lbError(f"the connection table of {ways} ways never filled")
            slots = getattr(lb.conntrack, "syn_slots", 0)
            syn = with_tcp(case.frame, "S")
            for _ in range(100):
                if not slots or len(lb.conntrack.syn_items()) == slots:
                    return
                self.through_harness(case, slots, syn)
            raise L4lbError(f"the SYN table of {slots} slots never filled")
        entries = ctmap.count(lb.conntrack)
        chunk = self.share
        for _ in range(4 * self.ncpus + 4):
            self.through_harness(case, chunk, ack)
            now = ctmap.count(lb.conntrack)
            grew, entries = now - entries, now
            if grew < chunk // 2:
                return
        raise L4lbError(f"the connection table of {self.capacity.ct_size} entries never filled")

    def harness_alone(self, case: Case, fails: list[str], flow: int | None = None,
                      runs: int | None = None) -> Timing:
        """The harness tail-calling XDP_DROP, on the case's frame (and flows): from flow
        number `flow`, or by default from the next one, which it then moves on; `runs`
        runs (default: repeat)."""
        advance = flow is None
        runs = runs or self.repeat
        self.harness.load_frame(case.frame, case.vary, self.next_flow if advance else flow)
        t = self.harness.time(self.harness.drop.fd, runs)
        hb = self.harness.counts()
        if case.vary and advance:
            self.next_flow += runs
        if t.result.verdict != XDP_DROP or hb.runs != runs or hb.moved or hb.failed:
            fails.append(f"harness alone: verdict {t.result.verdict_name}, {hb}")
        return t

    # ---- the proofs, shared by every way of measuring ----------------------------------------
    @staticmethod
    def record_timing(res: RoundResult, t: Timing, before: Timing | None = None,
                      after: Timing | None = None) -> None:
        """The case's time and, through the harness, the lower of the harness-alone runs
        timed before and after it (the one the machine's noise touched least)."""
        res.ns, res.wall_ns = t.kernel_ns, t.wall_ns
        if before is not None:
            res.harness_runs_ns = [before.kernel_ns, after.kernel_ns]
            best = min(before, after, key=lambda x: x.kernel_ns)
            res.harness_ns, res.harness_wall_ns = best.kernel_ns, best.wall_ns
            res.net_ns = res.ns - res.harness_ns

    def prove_counters(self, res: RoundResult, case: Case, before: tuple, after: tuple,
                       fails: list[str]) -> None:
        """The path from the balancer's counters (lb.stats() before and after the run)."""
        repeat, (g0, p0), (g1, p1) = self.repeat, before, after
        delta = {k: g1[k] - g0[k] for k in g1}
        res.counters = {k: v for k, v in delta.items() if v}
        for k, v in delta.items():
            want = repeat if k in case.counters else 0
            if v != want and not (k in case.may_move and 0 <= v <= repeat):
                fails.append(f"counter {k}: moved by {v}, expected {want}")
        if case.vip and p1 - p0 != repeat:
            fails.append(f"VIP {case.vip} packets: moved by {p1 - p0}, expected {repeat}")
        # .get: an older build (bench.ref) may not have every counter
        res.verdicts = {name: sum(delta.get(c, 0) for c in cs)
                        for name, cs in VERDICT_COUNTERS.items() if sum(delta.get(c, 0) for c in cs)}
        res.verdict_source = "balancer counters"

    def prove_verdicts(self, res: RoundResult, case: Case, fails: list[str]) -> None:
        want = libbpf.VERDICTS[case.verdict]
        if sum(res.verdicts.values()) != self.repeat or res.verdicts.get(want) != self.repeat:
            fails.append(f"verdicts {res.verdicts}, expected {want}={self.repeat}")

    def prove_harness(self, res: RoundResult, case: Case, hc, flow0: int,
                      fails: list[str], runs: int | None = None) -> None:
        """The harness ran every time and undid every head move; `runs` times (default:
        repeat) from flow number flow0."""
        repeat = runs or self.repeat
        res.harness_counts = asdict(hc)
        want_moved = repeat - 1 if case.head_moves else 0
        if hc.runs != repeat or hc.failed or hc.moved != want_moved or \
                hc.moved_bytes != case.head_moves * want_moved:
            fails.append(f"harness: {hc}; expected {repeat} runs, {want_moved} head moves "
                         f"of {case.head_moves} bytes")
        if case.vary and hc.flow != case.vary.after(flow0, repeat):
            fails.append(f"harness flow number {hc.flow}, "
                         f"expected {case.vary.after(flow0, repeat)}")

    @staticmethod
    def prove_last_run(case: Case, t: Timing, expected: libbpf.RunResult,
                       fails: list[str]) -> None:
        """The last run's verdict and output are those of a direct run on its packet."""
        if t.result.verdict != case.verdict:
            fails.append(f"last run: verdict {t.result.verdict_name}, "
                         f"expected {libbpf.VERDICTS[case.verdict]}")
        if t.result.data != expected.data:
            fails.append("last run: output differs from a direct run on its packet")

    # ---- established flows, every run another one -------------------------------------------
    def seed(self, lb: Balancer, first: bytes, vary: Vary, flow0: int, n: int, fails: list[str],
             grows: bool = True) -> int:
        """Sends flows flow0 .. flow0+n-1 their packet `first` (untimed), each the flow's
        first: a SYN, or another packet, which writes the flow's entry into the connection
        table itself in every build. Returns the entries written (ct_insert); grows: the
        table must have grown by n. SYNs of one call must not take each other's SYN slots
        (ct_syn_evict): their flows would find no entry."""
        table = lb.table_for(first)
        n0 = ctmap.count(table) if grows else 0
        g0, _ = lb.stats(None)
        self.harness.load_frame(first, vary, flow0)
        seeded = self.harness.time(lb.prog.fd, n).result
        g1, _ = lb.stats(None)
        inserted = g1["ct_insert"] - g0["ct_insert"]
        syn_evicted = g1.get("ct_syn_evict", 0) - g0.get("ct_syn_evict", 0)
        if seeded.verdict != XDP_TX or inserted != n or syn_evicted:
            fails.append(f"seeding: {inserted} entries written, {syn_evicted} SYN slots taken "
                         f"over; expected {n} and 0")
        if grows and ctmap.count(table) - n0 != n:
            fails.append(f"seeding: the table grew by {ctmap.count(table) - n0}, expected {n}")
        return inserted

    def measure_spread(self, case: Case, round_no: int, seeded: bool = False) -> RoundResult:
        """Every run hits a different established flow. seeded: this round's `repeat`
        flows get their entries first from the case's own packet (untimed, each flow's
        first: an ACK writes the entry, confirmed, in every build) and lose them after,
        so that every timed run is its flow's second packet; otherwise the runs cycle
        through the flows resident in the table (case.vary.wrap of them, made before,
        from flow number 0)."""
        repeat, lb, fails = self.repeat, self.lb(case), []
        res = RoundResult(case.name, round_no, repeat, 0, 0.0)
        table = lb.table_for(case.frame)
        inserted = 0
        if seeded:
            flow0 = self.next_flow
            self.next_flow += repeat
            inserted = self.seed(lb, case.frame, case.vary, flow0, repeat, fails,
                                 grows=not case.fill_table)
        else:
            flow0 = 0
            if hasattr(table, "remove_all") and ctmap.count(table) < case.vary.wrap:
                # a table of buckets gave up a resident flow for a SYN case's flow (both its
                # buckets full, rare; a build with a SYN table writes no SYN there): the
                # residents' own packets again, untimed, bring it back
                self.harness.load_frame(case.frame, case.vary, 0)
                self.harness.time(lb.prog.fd, case.vary.wrap)
                res.reseeded = True
                if ctmap.count(table) < case.vary.wrap:
                    fails.append("resident flows missing, and their packets did not bring them back")
        entries0 = ctmap.count(table)

        before = self.harness_alone(case, fails, flow0)
        s0 = lb.stats(case.vip)
        self.harness.load_frame(case.frame, case.vary, flow0)
        t = self.harness.time(lb.prog.fd, repeat)
        hc = self.harness.counts()
        s1 = lb.stats(case.vip)
        after = self.harness_alone(case, fails, flow0)
        self.record_timing(res, t, before, after)
        self.prove_counters(res, case, s0, s1, fails)
        self.prove_verdicts(res, case, fails)
        self.prove_harness(res, case, hc, flow0, fails)
        last = case.vary.apply(case.frame, case.vary.after(flow0, repeat - 1))
        self.prove_last_run(case, t, self.direct(case, last), fails)
        if not seeded:
            res.new_entries = ctmap.count(table) - entries0
            if res.new_entries:
                fails.append(f"the resident flows' table changed by {res.new_entries} entries")
        elif not case.fill_table:
            # newest first: the free list is left as the seeding found it (see ctmap.py)
            keys = ctmap.flow_keys(table, case.frame, case.vary, flow0, repeat)
            res.new_entries = ctmap.delete_keys(table, keys)
            if res.new_entries != repeat:
                fails.append(f"{res.new_entries} of the {repeat} spread flows found afterwards")
        else:
            res.new_entries = inserted
        res.failures = fails
        return res

    # ---- the first packet after a SYN ---------------------------------------------------------
    def syn_batches(self, table, case: Case, flow0: int, n: int) -> list[tuple[int, int]]:
        """(first flow number, runs) of the batches that flows flow0 .. flow0+n-1 go in:
        each the longest run of consecutive flows whose keys take distinct slots of a SYN
        table, which holds one flow a slot, so that the SYNs of a batch all wait there.
        The slots are the build's own; for a build without a SYN table, the working
        tree's slot function on the build's key bytes (builds with the same key layout
        run the same batches)."""
        if getattr(table, "syn_slots", 0):
            slot_of = table.syn_slot
        else:
            def slot_of(raw: bytes) -> int:
                return key_hash(raw) & (consts.CT_SYN_SLOTS - 1)
        ks = ctypes.sizeof(table.Key)
        keys = ctmap.flow_keys(table, case.frame, case.vary, flow0, n, newest_first=False)
        batches, taken, start = [], set(), 0
        for j in range(n):
            slot = slot_of(keys[j * ks:(j + 1) * ks])
            if slot in taken:
                batches.append((case.vary.after(flow0, start), j - start))
                taken, start = set(), j
            taken.add(slot)
        batches.append((case.vary.after(flow0, start), n - start))
        return batches

    def measure_after_syn(self, case: Case, round_no: int) -> RoundResult:
        """Every run the first packet after its flow's SYN (the flow's second packet),
        `repeat` new flows a round. A SYN table holds one flow a slot, far fewer than a
        round's flows, so the round goes in batches (syn_batches): the batch's SYNs,
        untimed, then its flows' packets, timed, and the harness alone on the same flows
        right before and after. The round's times are the means over all its runs; the
        proofs cover every batch, and the round's flows are removed at its end."""
        repeat, lb, fails = self.repeat, self.lb(case), []
        res = RoundResult(case.name, round_no, repeat, 0, 0.0)
        table = lb.table_for(case.frame)
        syn = with_tcp(case.frame, "S")
        flow0 = self.next_flow_after_syn
        self.next_flow_after_syn += repeat
        batches = self.syn_batches(table, case, flow0, repeat)
        entries0 = ctmap.count(table)
        evict0 = lb.stats(None)[0].get("ct_evict", 0)
        timings: list[list[Timing]] = [[], [], []]  # before, timed, after
        moved = dict.fromkeys(lb.stats(None)[0], 0)  # the counters' moves over the timed runs
        packets = 0
        counts = HarnessCounts(0, 0, 0, 0, 0)
        for first, n in batches:
            self.seed(lb, syn, case.vary, first, n, fails, grows=False)
            timings[0].append(self.harness_alone(case, fails, first, n))
            g0, p0 = lb.stats(case.vip)
            self.harness.load_frame(case.frame, case.vary, first)
            timings[1].append(self.harness.time(lb.prog.fd, n))
            hc = self.harness.counts()
            g1, p1 = lb.stats(case.vip)
            timings[2].append(self.harness_alone(case, fails, first, n))
            self.prove_harness(res, case, hc, first, fails, n)
            for k in moved:
                moved[k] += g1[k] - g0[k]
            packets += p1 - p0
            counts = HarnessCounts(counts.runs + hc.runs, counts.moved + hc.moved,
                                   counts.moved_bytes + hc.moved_bytes, counts.failed + hc.failed,
                                   hc.flow)
        before, t, after = (_mean_timing(ts, [n for _, n in batches]) for ts in timings)
        self.record_timing(res, t, before, after)
        self.prove_counters(res, case, (dict.fromkeys(moved, 0), 0), (moved, packets), fails)
        self.prove_verdicts(res, case, fails)
        res.harness_counts = asdict(counts)
        res.batches = len(batches)
        # every flow's entry now in the connection table, once, but for those a later flow
        # of the round gave up (ct_evict, by a SYN without a SYN table, else by a promotion)
        evicted = lb.stats(None)[0].get("ct_evict", 0) - evict0
        last = case.vary.apply(case.frame, case.vary.after(flow0, repeat - 1))
        self.prove_last_run(case, t, self.direct(case, last), fails)
        grew = ctmap.count(table) - entries0
        keys = ctmap.flow_keys(table, case.frame, case.vary, flow0, repeat)
        res.new_entries = ctmap.delete_keys(table, keys)  # newest first
        if grew != repeat - evicted or not repeat - evicted <= res.new_entries <= repeat:
            fails.append(f"connection table: grew by {grew}, {res.new_entries} of the {repeat} "
                         f"flows found, {evicted} given up; expected all the others")
        res.failures = fails
        return res

    # ---- one case, one round ------------------------------------------------------------------
    def in_namespace(self, case: Case, fn, *args):
        """fn(*args) where the case runs: a fib case on the FibNet's thread (the FIB
        the program asks is that of the running thread's namespace), from lb0."""
        if not case.fib:
            return fn(*args)

        def inside():
            self.ifindex = self.harness.ifindex = self.fibnet.lb0
            try:
                return fn(*args)
            finally:
                self.ifindex = self.harness.ifindex = 0
        return self.fibnet.node.run(inside)

    def measure(self, case: Case, round_no: int = 1) -> RoundResult:
        return self.in_namespace(case, self._measure, case, round_no)

    def _measure(self, case: Case, round_no: int = 1) -> RoundResult:
        if case.vary and case.vary.wrap:
            return self.measure_spread(case, round_no)
        if case.after_syn:
            return self.measure_after_syn(case, round_no)
        repeat = self.repeat
        fails: list[str] = []
        lb = self.lb(case) if case.target == "lb" else None
        if case.prime:
            if case.fib:  # a fresh FIB answer: kept (fib_hops) for the whole timed run
                lb.dp.bump_fib_gen()
            r = self.direct(case)
            if r.verdict != case.verdict:
                fails.append(f"priming run: verdict {r.verdict_name}")
        expected_out = None if case.vary else self.direct(case)

        res = RoundResult(case.name, round_no, repeat, 0, 0.0)
        before = self.harness_alone(case, fails) if case.harness else None

        flow0 = self.next_flow
        table = lb.table_for(case.frame) if lb else None
        entries0 = ctmap.count(table) if case.vary else 0
        s0 = lb.stats(case.vip) if lb else ({}, 0)
        if case.harness:
            self.harness.load_frame(case.frame, case.vary, flow0)
            t = self.harness.time(self.target_fd(case), repeat)
            hc = self.harness.counts()
        else:
            t = time_run(self.target_fd(case), case.frame, repeat)
            hc = None
        s1 = lb.stats(case.vip) if lb else ({}, 0)
        if case.vary:
            self.next_flow += repeat
        after = self.harness_alone(case, fails) if case.harness else None
        self.record_timing(res, t, before, after)

        # the path: the balancer's counters
        if lb:
            self.prove_counters(res, case, s0, s1, fails)
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
        self.prove_verdicts(res, case, fails)
        if hc is not None:
            self.prove_harness(res, case, hc, flow0, fails)

        # every SYN made its own new entry, but for those a later one gave up (ct_evict: a
        # way of the connection table; ct_syn_evict: a slot of the SYN table)
        if case.vary:
            entries1 = ctmap.count(table)
            evicted = sum(res.counters.get(k, 0) for k in EVICTS)
            if case.fill_table:
                res.new_entries = entries1 - entries0
                if "ct_evict" not in s1[0]:
                    # the kernel's LRU evicts a few entries at a time, uncounted: allow that much
                    if abs(entries1 - entries0) > EVICT_SLACK:
                        fails.append(f"full table: {entries0} entries before, {entries1} after; "
                                     "every insert should have evicted one")
                elif entries1 - entries0 != repeat - evicted:
                    fails.append(f"full table: {entries0} entries before, {entries1} after, "
                                 f"{evicted} given up; expected {repeat - evicted} more")
            else:
                # delete exactly this round's flows, newest first (see ctmap.py); a flow
                # given up for a later one of the round is not there
                keys = ctmap.flow_keys(table, case.frame, case.vary, flow0, repeat)
                res.new_entries = ctmap.delete_keys(table, keys)
                if entries1 - entries0 != repeat - evicted or res.new_entries > repeat or \
                        res.new_entries < repeat - evicted:
                    fails.append(f"connection table: {entries1 - entries0} new entries, "
                                 f"{res.new_entries} of the {repeat} flows found, {evicted} "
                                 "given up; expected all the others")

        if case.vary:
            last = flow0 + repeat - 1
            expected_out = self.direct(case, case.vary.apply(case.frame, last))
            if not case.fill_table:
                ctmap.delete_keys(table, ctmap.flow_keys(table, case.frame, case.vary, last, 1))
        self.prove_last_run(case, t, expected_out, fails)
        res.failures = fails
        return res
