"""Health probes through the tunnel, end to end: the probe encapsulator on the
LB's interface (tc egress) and a prober in the LB's namespace, against the
backends the running `l4lb run` was given over gRPC. A tunnel probe to the
VIP marked for b1 reaches b1's server (b1 alone decapsulates it); with the
VIP gone from b1's loopback the tunnel probe fails while a direct probe to
b1's address still succeeds: the tunnel probe tests what client traffic
needs, the direct one does not."""
from __future__ import annotations

import ipaddress
import subprocess
import threading

import pytest

from control.l4lb.v1 import l4lb_pb2 as pb
from e2e_util import wait_for
from l4lb import bpf, consts, netlink
from l4lb.probe import Prober, Target, probe_mark

FAST = dict(interval=0.2, timeout=0.5, rise=2, fall=2)


class Transitions:
    def __init__(self):
        self.seen: list[tuple] = []
        self.lock = threading.Lock()

    def __call__(self, key, up, reason, latency):
        with self.lock:
            self.seen.append((key, up, reason))

    def of(self, key):
        with self.lock:
            return [(up, reason) for k, up, reason in self.seen if k == key]


@pytest.fixture(scope="module")
def encap(bed, lb):
    """The probe encapsulator attached to the LB's interface, sharing the
    running balancer's pinned maps; detached (no trace left) afterwards."""
    cap = lb.call("GetStatus", pb.GetStatusRequest()).capacity
    capacity = consts.Capacity(max_vips=cap.max_vips, max_backends=cap.max_backends,
                               ct_size=cap.conntrack_entries, ring_size=cap.ring_size)
    prog = bpf.load_probe_encap(capacity, str(bed.lb.pin_dir))
    bed.lb.run(prog.attach_egress, bed.lb.ifname)
    try:
        yield prog
    finally:
        bed.lb.run(prog.detach)
        prog.close()
    assert not bed.lb.run(netlink.has_clsact, bed.lb.ifname), "detach leaves no clsact qdisc behind"


def backend_index(prog, address: str) -> int:
    """The index the balancer gave address, read from the shared backends map."""
    want = ipaddress.ip_address(address).packed.ljust(16, b"\0")
    t = prog.table(consts.MAP_BACKENDS)
    for k, v in t.items():
        raw = b"".join(int(w).to_bytes(4, "little") for w in v.addr)
        if v.flags & consts.BACKEND_F_VALID and raw == want:
            return k.value
    raise AssertionError(f"{address} is not in the balancer's backends map")


@pytest.fixture
def prober(bed):
    rec = Transitions()
    p = bed.lb.run(Prober, rec)  # its thread, and so its sockets, live in the LB's namespace
    p.rec = rec
    yield p
    p.stop()


def test_tunnel_probes_reach_the_chosen_backend_and_fail_without_its_vip(bed, lb, encap, prober):
    b1, b2, b3 = bed.backends[:3]
    vip4, vip6 = bed.vip4(5), bed.vip6(5)
    with lb.vip(vip4, {b1.addr4: 1, b2.addr4: 1, b3.addr6: 1}), lb.vip(vip6, {b1.addr6: 1, b2.addr6: 1}):
        i4, i6, i3 = (backend_index(encap, a) for a in (b1.addr4, b1.addr6, b3.addr6))
        for b in bed.backends:
            b.zero_decap_counts()
        stats0 = bpf.percpu_sum(encap.table(consts.MAP_PROBE_STATS))
        prober.set_targets([
            Target("4in4 b1", vip4, 80, mark=probe_mark(i4), **FAST),
            Target("6in6 b1", vip6, 80, mark=probe_mark(i6), **FAST),
            Target("4in6 b3", vip4, 80, mark=probe_mark(i3), **FAST),
            Target("direct b1", b1.addr4, 80, **FAST),
        ])
        wait_for(lambda: all(s.state == "up" for s in prober.results().values()), 10, "every probe up")
        for key in ("4in4 b1", "6in6 b1", "4in6 b3", "direct b1"):
            assert prober.rec.of(key) == [(True, "connected")], key
        got = {b.role: b.decap_counts() for b in bed.backends}
        assert got["b1"]["decap4"] > 0 and got["b1"]["decap6"] > 0, "b1 decapsulated its probes"
        assert got["b3"]["decap6"] > 0, "b3 decapsulated its 4in6 probes"
        assert got["b2"] == {"decap4": 0, "decap6": 0}, "no probe went anywhere else"
        moved = {k: v - stats0[k] for k, v in bpf.percpu_sum(encap.table(consts.MAP_PROBE_STATS)).items()}
        assert moved["encap4"] > 0 and moved["encap6"] > 0
        assert moved["error"] == 0 and moved["no_backend"] == 0

        # the negative control: b1 keeps decapsulating and serving, but no longer owns the VIP
        lo = b1.index("lo")
        b1.ipr.addr("del", index=lo, address=vip4, prefixlen=32)
        try:
            wait_for(lambda: prober.results()["4in4 b1"].state == "down", 10, "the tunnel probe to fail")
            assert prober.rec.of("4in4 b1")[-1][0] is False
            assert prober.results()["direct b1"].state == "up"
            assert prober.rec.of("direct b1") == [(True, "connected")], "the direct probe never noticed"
            assert prober.results()["6in6 b1"].state == "up", "the other family's VIP is still there"
        finally:
            b1.ipr.addr("add", index=lo, address=vip4, prefixlen=32)
        wait_for(lambda: prober.results()["4in4 b1"].state == "up", 10, "the tunnel probe to recover")


def test_tunnel_probes_carry_complete_checksums_when_the_stack_fills_them(bed, lb, encap, prober):
    """With checksum offload off on the LB's interface the stack completes the
    TCP checksum after the tc program ran (skb csum_start still points at the
    inner header): the backend verifies every probe packet and counts no error."""
    b1 = bed.backends[0]
    vip4 = bed.vip4(6)
    nsenter = bed.lb.nsenter()
    with lb.vip(vip4, {b1.addr4: 1}):
        idx = backend_index(encap, b1.addr4)
        subprocess.run(nsenter + ["ethtool", "-K", bed.lb.ifname, "tx", "off"], check=True, capture_output=True)
        try:
            errors0 = b1.snmp()["Tcp.InCsumErrors"]
            segs0 = b1.snmp()["Tcp.InSegs"]
            prober.set_targets([Target("b1", vip4, 80, mark=probe_mark(idx), **FAST)])
            wait_for(lambda: prober.results()["b1"].probes >= 4, 10, "four probes")
            assert prober.results()["b1"].state == "up"
            assert b1.snmp()["Tcp.InSegs"] > segs0
            assert b1.snmp()["Tcp.InCsumErrors"] == errors0
        finally:
            subprocess.run(nsenter + ["ethtool", "-K", bed.lb.ifname, "tx", "on"], capture_output=True)
