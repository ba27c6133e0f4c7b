"""The per-packet benchmark checked with a tiny repeat: the harness really
puts the packet back, every case takes the path it claims on every run, the
SYN case makes one new connection-table entry per run (but for the flows whose
SYN slot a later SYN took), and the first ACK after a SYN moves its entry into
the connection table. Nothing here asserts a timing."""
import io
import json

import pytest
from rich.console import Console
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from bench import ctmap
from bench.pktcost import RESIDENT, PktCost, run, run_ab
from l4lb import libbpf

pytestmark = pytest.mark.kernel

REPEAT = 1000
THROUGH_HARNESS = ["established", "established_fib", "syn", "syn6", "syn_resident", "syn_ack", "spread",
                   "syn_evict", "udp", "v6", "v4_in_v6", "gue", "gue6", "pass", "icmp_echo", "encap"]
ALL_CASES = THROUGH_HARNESS + ["pass_direct", "drop_direct"]


@pytest.fixture(scope="module")
def bench():
    b = PktCost(REPEAT)
    yield b
    b.close()


def test_the_cases_are_the_ones_checked_here(bench):
    assert [c.name for c in bench.cases] == ALL_CASES


@pytest.mark.parametrize("name", THROUGH_HARNESS)
def test_one_run_through_the_harness_equals_a_direct_run(bench, name):
    case = bench.case(name)
    direct = bench.in_namespace(case, bench.direct, case)  # a fib case: in its namespace of routes
    bench.harness.load_frame(case.frame, case.vary, flow=0)  # flow 0: the frame as built
    through = bench.in_namespace(case, bench.harness.time, bench.target_fd(case), 1).result
    assert direct.verdict == case.verdict
    assert through.verdict == direct.verdict
    assert through.data == direct.data
    if case.vary and not case.fill_table and not case.vary.wrap:
        ct = bench.lb(case).table_for(case.frame)
        assert ctmap.delete_keys(ct, ctmap.flow_keys(ct, case.frame, case.vary, 0, 1)) == 1


@pytest.mark.parametrize("name", ["established", "encap", "v6"])
def test_repeat_without_the_harness_times_its_own_output(bench, name):
    """The pitfall the harness exists for, and the harness fixing it."""
    case = bench.case(name)
    once = bench.direct(case)
    bare = libbpf.run(bench.target_fd(case), case.frame, repeat=REPEAT)
    assert bare.verdict != case.verdict or bare.data != once.data
    bench.harness.load_frame(case.frame)
    through = bench.harness.time(bench.target_fd(case), REPEAT).result
    assert through.verdict == case.verdict and through.data == once.data
    counts = bench.harness.counts()
    assert counts.runs == REPEAT and counts.failed == 0
    assert counts.moved == REPEAT - 1 and counts.moved_bytes == case.head_moves * (REPEAT - 1)


@pytest.mark.parametrize("name", ALL_CASES)
def test_every_case_proves_its_path_on_every_run(bench, name):
    case = bench.case(name)
    r = bench.measure(case)
    assert r.failures == []
    assert r.verdicts == {libbpf.VERDICTS[case.verdict]: REPEAT}
    if case.target == "lb":
        # SYNs of a round take each other's SYN slots: counted, and only where the case says
        moved = dict(r.counters)
        syn_evicted = moved.pop("ct_syn_evict", 0)
        assert moved == {c: REPEAT for c in case.counters}
        assert syn_evicted == 0 or "ct_syn_evict" in case.may_move
    if case.harness:
        assert r.harness_counts["runs"] == REPEAT
        assert r.harness_counts["failed"] == 0
        # a batch's first run finds the head where the frame put it (after_syn: several)
        assert r.harness_counts["moved_bytes"] == case.head_moves * (REPEAT - (r.batches or 1))
        assert r.net_ns == r.ns - r.harness_ns


def syn_evicted(lb, run) -> int:
    """ct_syn_evict's move over run(): SYNs that took another flow's SYN slot."""
    before = lb.stats(None)[0]["ct_syn_evict"]
    run()
    return lb.stats(None)[0]["ct_syn_evict"] - before


def test_syn_case_makes_one_new_entry_per_run(bench):
    case = bench.case("syn")
    lb = bench.lb(case)
    ct = lb.conntrack
    before = ctmap.count(ct)
    first = bench.next_flow
    # a SYN's entry waits in the SYN table, whose slots the round's flows share
    taken = syn_evicted(lb, lambda: bench.through_harness(case, REPEAT))
    assert 0 < taken < REPEAT // 10
    assert ctmap.count(ct) - before == REPEAT - taken
    assert len(ct.syn_items()) == REPEAT - taken
    # each run's own flow is there but for those: deleting exactly the run's flows finds them
    keys = ctmap.flow_keys(ct, case.frame, case.vary, first, REPEAT)
    assert ctmap.delete_keys(ct, keys) == REPEAT - taken
    assert ctmap.count(ct) == before and ct.syn_items() == []
    r = bench.measure(case)
    assert r.failures == [] and r.new_entries == REPEAT - r.counters.get("ct_syn_evict", 0)
    assert ctmap.count(ct) == before


@pytest.mark.parametrize("name", ["syn6", "syn_resident"])
def test_other_syn_cases_make_one_new_entry_per_run_beside_what_is_resident(bench, name):
    case = bench.case(name)
    ct = bench.lb(case).table_for(case.frame)
    before = ctmap.count(ct)
    if case.resident:
        assert before == RESIDENT
    r = bench.measure(case)
    assert r.failures == [] and r.new_entries == REPEAT - r.counters.get("ct_syn_evict", 0)
    assert ctmap.count(ct) == before


def test_the_first_ack_after_a_syn_moves_its_entry_into_the_connection_table(bench):
    case = bench.case("syn_ack")
    ct = bench.lb(case).conntrack
    before = ctmap.count(ct)
    r = bench.measure(case)
    assert r.failures == []
    assert r.counters == {"tx": REPEAT, "ct_hit": REPEAT, "ct_promote": REPEAT}
    assert r.new_entries == REPEAT and r.batches > 1
    # the round's flows are gone again, from both tables
    assert ctmap.count(ct) == before and ct.syn_items() == []


def test_after_syn_batches_are_the_longest_runs_of_flows_with_distinct_syn_slots(bench):
    case = bench.case("syn_ack")
    ct = bench.lb(case).conntrack
    batches = bench.syn_batches(ct, case, 5, 3 * REPEAT)
    assert batches[0][0] == 5 and sum(n for _, n in batches) == 3 * REPEAT
    keys = ctmap.flow_keys(ct, case.frame, case.vary, 5, 3 * REPEAT, newest_first=False)
    slots = [ct.syn_slot(keys[i:i + 16]) for i in range(0, len(keys), 16)]
    for (first, n), (nxt, _) in zip(batches, batches[1:] + [(None, 0)]):
        mine = slots[first - 5:first - 5 + n]
        assert len(set(mine)) == n
        if nxt is not None:
            assert nxt == first + n and slots[nxt - 5] in mine  # the next flow's slot is taken


def test_spread_hits_a_different_resident_flow_on_every_run(bench):
    case = bench.case("spread")
    assert case.vary.wrap == RESIDENT
    ct = bench.lb(case).table_for(case.frame)
    # every resident flow is in the table under the key the harness makes for it
    keys = ctmap.flow_keys(ct, case.frame, case.vary, 0, RESIDENT)
    assert len(set(keys[i:i + 16] for i in range(0, len(keys), 16))) == RESIDENT
    assert ctmap.count(ct) == RESIDENT
    r = bench.measure(case)
    assert r.failures == [] and r.counters == {"tx": REPEAT, "ct_hit": REPEAT}
    assert r.harness_counts["flow"] == case.vary.after(0, REPEAT) and ctmap.count(ct) == RESIDENT


def test_spread_visits_every_resident_flow_once_per_cycle_in_an_order_unlike_their_making(bench):
    case = bench.case("spread")
    visits = case.vary.numbers(0, RESIDENT)
    assert sorted(visits.tolist()) == list(range(RESIDENT))
    # consecutive visits are far apart in the order the flows were made (and their
    # entries allocated): no table reads its entries in memory order
    gaps = abs(visits[1:].astype(int) - visits[:-1].astype(int))
    assert gaps.min() > RESIDENT // 4
    # the harness makes the same sequence: after a cycle it is back at the first flow
    assert case.vary.after(0, RESIDENT) == 0
    bench.harness.load_frame(case.frame, case.vary, flow=0)
    bench.harness.time(bench.harness.drop.fd, 3)
    assert bench.harness.counts().flow == case.vary.after(0, 3) == int(visits[3])


def test_syn_into_the_full_table_evicts_instead_of_growing(bench):
    case = bench.case("syn_evict")
    ct = bench.lb(case).conntrack
    before = ctmap.count(ct)
    assert before >= bench.share - 16
    assert len(ct.syn_items()) == ct.syn_slots
    r = bench.measure(case)
    assert r.failures == [] and r.counters["ct_insert"] == REPEAT
    assert abs(ctmap.count(ct) - before) <= 16
    # what it gives up is another SYN waiting in the full SYN table, never a connection
    assert r.counters["ct_syn_evict"] == REPEAT and "ct_evict" not in r.counters


def test_varied_flows_keep_valid_checksums(bench):
    case = bench.case("syn")
    flow = 0x0003_1234
    bench.harness.load_frame(case.frame, case.vary, flow=flow)
    # XDP_DROP leaves the frame as the harness made it
    out = bench.harness.time(bench.harness.drop.fd, 1).result.data
    assert out == case.vary.apply(case.frame, flow)
    pkt = Ether(out)
    assert pkt[IP].src == "198.18.0.8" and pkt[TCP].sport == 40000 + 0x1234
    ip_sum, tcp_sum = pkt[IP].chksum, pkt[TCP].chksum
    del pkt[IP].chksum
    del pkt[TCP].chksum
    rebuilt = Ether(bytes(pkt))
    assert (rebuilt[IP].chksum, rebuilt[TCP].chksum) == (ip_sum, tcp_sum)


def test_report_has_machine_ratios_and_every_round(bench, tmp_path):
    out = tmp_path / "pktcost.json"
    console = Console(file=io.StringIO(), width=160)
    report = run(REPEAT, 1, out, console=console, bench=bench)
    assert report["ok"], report["failures"]
    saved = json.loads(out.read_text())
    assert saved["machine"]["cpu_model"] and saved["machine"]["kernel"]
    assert saved["settings"]["repeat"] == REPEAT
    assert {c["name"] for c in saved["cases"]} == set(ALL_CASES)
    assert all(len(c["rounds"]) == 1 for c in saved["cases"])
    assert set(saved["summary"]["ratios"]) >= {"established / encap", "syn / encap", "pass / drop",
                                               "gue / established", "gue6 / v6",
                                               "established_fib / established"}
    text = console.file.getvalue()
    assert "established" in text and "ratios" in text


def test_against_another_commit_times_both_builds_through_one_harness(tmp_path):
    """--against: the old commit's own package and program, set up the same way, every
    path proven on both (b82801c: the commit whose program the targets compare with)."""
    out = tmp_path / "ab.json"
    console = Console(file=io.StringIO(), width=160)
    report = run_ab("b82801c", REPEAT, 1, out, console=console, full_table=False,
                    only=frozenset({"established", "syn", "syn6", "syn_ack", "gue"}))
    assert report["ok"], report["failures"]
    assert "gue" not in report["ab"]  # a build before GUE has no GUE case to compare
    saved = json.loads(out.read_text())
    assert saved["settings"]["old_commit"].startswith("b82801c")
    assert {"established", "syn", "syn6", "encap"} <= set(saved["ab"])
    for c in saved["cases"]:
        assert len(c["rounds_new"]) == len(c["rounds_old"]) == 1
    assert saved["ab"]["syn"]["net"]["median"] > 0
    # the first ACK after a SYN: a plain hit in the old build, the same flows in the same batches
    ack = next(c for c in saved["cases"] if c["name"] == "syn_ack")
    new, old = ack["rounds_new"][0], ack["rounds_old"][0]
    assert new["counters"] == {"tx": REPEAT, "ct_hit": REPEAT, "ct_promote": REPEAT}
    assert old["counters"] == {"tx": REPEAT, "ct_hit": REPEAT}
    assert new["batches"] == old["batches"] > 1
