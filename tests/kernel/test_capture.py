"""Live capture in the data plane: while lb_config.capture is set, the
packets capture_cfg selects are copied to the capture ring (a forwarded
packet twice: as received and as sent), filters select exactly, a full ring
drops copies and counts them without changing a verdict or a byte of what
is forwarded, and with capture off nothing is copied."""
import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from l4lb import consts
from lbfixture import CLIENT4, CLIENT_MAC, LB_MAC, VIP4, Flow

pytestmark = pytest.mark.kernel

A4, B4 = "198.18.2.1", "198.18.2.2"
TX, PASS, DROP = (consts.CAPTURE_VERDICTS[v] for v in ("tx", "pass", "drop"))
ALL = (1 << TX) | (1 << PASS) | (1 << DROP)


class Copies:
    def __init__(self, lb):
        self.records = []
        self.reader = lb.dp.capture_reader(self.records.append)

    def take(self):
        self.reader.consume()
        out, self.records[:] = list(self.records), []
        return out

    def close(self):
        self.reader.close()


@pytest.fixture
def copies(lb):
    c = Copies(lb)
    c.take()  # what an earlier test left in the ring
    yield c
    lb.dp.capture_stop()
    c.close()


def data(rec) -> bytes:
    return bytes(rec.data[:rec.cap_len])


def test_nothing_is_copied_while_capture_is_off(lb, copies):
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    assert lb.run(Flow().packet("S")).verdict == "TX"
    assert copies.take() == []
    assert lb.capture_counts() == {"copied": 0, "lost": 0}


def test_a_forwarded_packet_is_copied_as_received_and_as_sent(lb, copies):
    vip = lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    lb.dp.capture_start(0, 0, ALL, consts.CAPTURE_SNAP_MAX)
    pkt = bytes(Flow().packet("S", payload=b"abc"))
    r = lb.run(pkt)
    assert r.verdict == "TX"
    got = copies.take()
    assert [(c.sent, c.verdict) for c in got] == [(0, TX), (1, TX)]
    received, sent = got
    assert data(received) == pkt and received.len == len(pkt)
    assert data(sent) == r.data and sent.len == len(r.data)
    idx = lb.index_of(A4)[0]
    for c in got:
        assert (c.vip, c.backend) == (vip.vip_id + 1, idx) and c.ts > 0
    assert (sent.cpu, sent.seq) == (received.cpu, received.seq + 1)
    assert lb.capture_counts() == {"copied": 2, "lost": 0}


def test_filters_select_exactly_the_vip_the_backend_and_the_verdict(lb, copies):
    a = lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    lb.add_vip(VIP4, 443, "tcp", {B4: 1})
    lb.add_vip(VIP4, 8080, "tcp", {})  # drops: no backend
    to_a, to_b, dropped = Flow(), Flow(dport=443), Flow(dport=8080)
    other = Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=CLIENT4, dst="198.18.10.99") / TCP(dport=80)

    def copied(vip=0, backend=0, verdicts=ALL):
        lb.dp.capture_start(vip, backend, verdicts, 64)
        for p in (to_a.packet("S"), to_b.packet("S"), dropped.packet("S"), other):
            lb.run(p)
        lb.dp.capture_stop()
        return [(c.vip, c.backend, c.verdict, c.sent) for c in copies.take()]

    ia, ib = lb.index_of(A4)[0], lb.index_of(B4)[0]
    va = a.vip_id + 1
    assert copied(vip=va) == [(va, ia, TX, 0), (va, ia, TX, 1)]
    assert {(v, b) for v, b, _, _ in copied(backend=ib)} == {(lb.state.vips[next(
        k for k in lb.state.vips if k.port == 443)].vip_id + 1, ib)}
    assert [(verdict, sent) for _, _, verdict, sent in copied(verdicts=1 << DROP)] == [(DROP, 0)]
    assert copied(verdicts=1 << PASS) == [(0, 0, PASS, 0)]
    assert len(copied()) == 2 + 2 + 1 + 1


def test_snaplen_cuts_the_copy_not_the_packet(lb, copies):
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    lb.dp.capture_start(0, 0, ALL, 60)
    pkt = bytes(Flow().packet("A", payload=b"x" * 500))
    r = lb.run(pkt)
    got = copies.take()
    assert [c.cap_len for c in got] == [60, 60]
    assert [c.len for c in got] == [len(pkt), len(r.data)]
    assert data(got[0]) == pkt[:60]


def test_a_full_ring_loses_copies_and_counts_them_but_forwards_the_same(lb, copies):
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    f = Flow()
    lb.run(f.packet("S"))
    baseline = lb.run(f.packet("A", payload=b"y" * 1400))
    lb.dp.capture_start(0, 0, ALL, consts.CAPTURE_SNAP_MAX)
    per_copy = 1632 + 8
    n = consts.CAPTURE_RING_BYTES // per_copy  # copies the ring holds; each packet makes two
    results = [lb.run(f.packet("A", payload=b"y" * 1400)) for _ in range(n // 2 + 20)]
    assert {(r.verdict, r.data) for r in results} == {(baseline.verdict, baseline.data)}
    counts = lb.capture_counts()
    assert counts["lost"] > 0 and counts["copied"] + counts["lost"] == 2 * len(results)
    assert len(copies.take()) == counts["copied"]
