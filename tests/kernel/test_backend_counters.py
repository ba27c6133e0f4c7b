"""Per-backend counters (backend_stats) and per-VIP new flows (vip_flows) on
the real program: what each packet moves, that a backend keeps its counts
while it keeps its index, and that an index given to another backend starts
from zero."""
import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from lbfixture import CLIENT4, CLIENT_MAC, LB_MAC, VIP4, Flow, find_flow

pytestmark = pytest.mark.kernel

A4, B4, C4 = "198.18.2.1", "198.18.2.2", "198.18.2.3"
ZERO = {"packets": 0, "bytes": 0, "new_flows": 0}


def counts(lb, address):
    return lb.backend_stats(lb.index_of(address)[0])


def test_a_connection_counts_one_new_flow_and_every_packet_on_its_backend(lb):
    m = lb.capacity.ring_size
    backends = {A4: 1, B4: 1}
    vip = lb.add_vip(VIP4, 80, "tcp", backends)
    fa = find_flow(backends, lambda b: b == A4, m)
    fb = find_flow(backends, lambda b: b == B4, m, start=fa.sport + 1)
    sent_a = [fa.packet("S"), fa.packet("A"), fa.packet("A", payload=b"x" * 300), fa.packet("FA")]
    sent_b = [fb.packet("S"), fb.packet("A", payload=b"y" * 10)]
    for p in sent_a + sent_b:
        assert lb.run(p).verdict == "TX"
    assert counts(lb, A4) == {"packets": 4, "bytes": sum(len(p) for p in sent_a), "new_flows": 1}
    assert counts(lb, B4) == {"packets": 2, "bytes": sum(len(p) for p in sent_b), "new_flows": 1}
    assert lb.vip_new_flows(vip.vip_id) == 2
    # the backends' packets and bytes add up to the VIP's
    assert lb.vip_stats(vip.vip_id) == {"packets": 6, "bytes": sum(len(p) for p in sent_a + sent_b)}


def test_a_syn_of_a_reused_five_tuple_is_a_new_flow_again(lb):
    vip = lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    f = Flow()
    for _ in range(3):
        lb.run(f.packet("S"))
        lb.run(f.packet("A"))
    assert counts(lb, A4)["new_flows"] == 3 and counts(lb, A4)["packets"] == 6
    assert lb.vip_new_flows(vip.vip_id) == 3


def test_rst_and_dropped_packets_count_no_backend_traffic(lb):
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    f = Flow()
    assert lb.run(f.packet("R")).verdict == "TX"  # sent, but a RST makes no entry
    assert counts(lb, A4) == {"packets": 1, "bytes": len(f.packet("R")), "new_flows": 0}
    lb.set_backends(VIP4, 80, "tcp", {A4: 0})  # drained: a new flow has nowhere to go
    g = Flow(sport=41000)
    assert lb.run(g.packet("S")).verdict == "DROP"
    assert counts(lb, A4) == {"packets": 1, "bytes": len(f.packet("R")), "new_flows": 0}


def test_rate_limited_new_flows_still_count_as_new_flows(lb):
    lb.configure(new_flow_rate=1)
    vip = lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    before = lb.stats()
    for i in range(3):
        assert lb.run(Flow(sport=42000 + i).packet("S")).verdict == "TX"
    moved = {k: v - before[k] for k, v in lb.stats().items() if v != before[k]}
    assert moved["ct_insert"] + moved["ct_limited"] == 3 and moved["ct_limited"] >= 1
    assert counts(lb, A4)["new_flows"] == 3
    assert lb.vip_new_flows(vip.vip_id) == 3


def test_no_conntrack_vip_counts_packets_but_no_new_flows(lb):
    vip = lb.add_vip(VIP4, 80, "tcp", {A4: 1}, flags=("no_conntrack",))
    f = Flow()
    lb.run(f.packet("S"))
    lb.run(f.packet("A"))
    assert counts(lb, A4)["packets"] == 2 and counts(lb, A4)["new_flows"] == 0
    assert lb.vip_new_flows(vip.vip_id) == 0


def test_a_backend_keeps_its_counts_through_weight_changes_and_other_vips(lb):
    lb.add_vip(VIP4, 80, "tcp", {A4: 1, B4: 1})
    f = find_flow({A4: 1, B4: 1}, lambda b: b == A4, lb.capacity.ring_size)
    lb.run(f.packet("S"))
    lb.run(f.packet("A"))
    have = counts(lb, A4)
    lb.set_backends(VIP4, 80, "tcp", {A4: 5, B4: 1})
    lb.add_vip(VIP4, 443, "tcp", {A4: 1})  # the same address on another VIP: the same index
    lb.set_backends(VIP4, 80, "tcp", {A4: 0, B4: 1})
    assert counts(lb, A4) == have
    assert lb.run(f.packet("A")).verdict == "TX"  # drained, established flow stays
    assert counts(lb, A4)["packets"] == have["packets"] + 1


def test_an_index_given_to_another_backend_starts_from_zero(lb):
    lb.few_backend_indices(2)
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    f = Flow()
    lb.run(f.packet("S"))
    lb.run(f.packet("A"))
    assert lb.index_of(A4) == (1, 1) and counts(lb, A4)["packets"] == 2
    lb.set_backends(VIP4, 80, "tcp", {B4: 1})  # B4 takes index 2, A4 leaves index 1
    assert lb.backend_stats(1)["packets"] == 2  # a removed backend's counts stay until the index is reused
    lb.set_backends(VIP4, 80, "tcp", {B4: 1, C4: 1})  # C4 reuses index 1
    assert lb.index_of(C4) == (1, 2)
    assert counts(lb, C4) == ZERO
    assert counts(lb, B4) == ZERO


def test_a_packet_for_no_vip_moves_no_backend_counter(lb):
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    pkt = Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=CLIENT4, dst="198.18.10.99") / TCP(dport=80)
    assert lb.run(pkt).verdict == "PASS"
    assert counts(lb, A4) == ZERO


def test_counter_tables_read_every_entry_summed_over_cpus(lb):
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    f = Flow()
    lb.run(f.packet("S"))
    lb.run(f.packet("A"))
    tables = lb.counter_tables()
    arr, fields = tables["backend_stats"]
    assert fields == ["packets", "bytes", "new_flows"]
    assert arr.shape == (lb.capacity.max_backends + 1, 3)
    idx = lb.index_of(A4)[0]
    assert dict(zip(fields, map(int, arr[idx]))) == counts(lb, A4)
    assert int(arr.sum()) == sum(counts(lb, A4).values())
    vs, vfields = tables["vip_stats"]
    assert dict(zip(vfields, map(int, vs[0]))) == lb.vip_stats(0)
