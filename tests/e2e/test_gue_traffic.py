"""GUE end to end: real TCP connections from the clients through the LB to
VIPs with encap: gue, to backends that take the GUE off (the XDP decap
program; the kernel's fou ports on ipip/ip6tnl devices where the kernel has
them), in 4in4, 4in6 and 6in6; and the control: a backend that does not take
GUE on that port never sees the connection. Health probes through the tunnel
travel in GUE too."""
from __future__ import annotations


import pytest

from control.l4lb.v1 import l4lb_pb2 as pb
from e2e_util import canonical, close_all, delta, settle, wait_for
from l4lb import decap
from l4lb.testbed import TestbedError, fou_support

CONNECTIONS = 60  # per VIP


@pytest.fixture(scope="module", autouse=True)
def gue_capable(bed):
    if bed.decap == "ipip" and not fou_support()[0]:
        pytest.skip(f"GUE over tunnel devices: {fou_support()[1]}; the XDP decap program ran these tests")


CASES = {  # name: (VIP picker, backend family)
    "4in4": (lambda bed: bed.vip4(1), 4),
    "4in6": (lambda bed: bed.vip4(2), 6),
    "6in6": (lambda bed: bed.vip6(1), 6),
}


@pytest.mark.parametrize("kind", CASES)
def test_tcp_connections_through_gue_reach_the_backend_the_lb_chose(bed, lb, kind):
    pick, family = CASES[kind]
    vip = pick(bed)
    backends = {(b.addr4 if family == 4 else b.addr6): 1 for b in bed.backends}
    by_address = {canonical(a): b for a, b in zip(backends, bed.backends)}
    with lb.vip(vip, backends, encap="gue") as vid:
        assert lb.call("GetVip", pb.GetVipRequest(id=vid)).encap == "gue"
        gue0 = {b.role: b.gue_total() for b in bed.backends}
        dec0 = {b.role: b.decap_counts() for b in bed.backends}
        seg0, lb0 = bed.client_segments(), lb.counters()
        conns, answered = [], {}
        for i in range(CONNECTIONS):
            c = bed.clients[i % len(bed.clients)].connect(vid.address)
            answer = c.ask("hello")
            conns.append(c)
            answered[answer] = answered.get(answer, 0) + 1
        close_all(conns)
        segments = settle(bed.client_segments) - seg0
        dec = settle(lambda: {b.role: delta(b.decap_counts(), dec0[b.role]) for b in bed.backends})
        moved = delta(lb.counters(), lb0)
        for c in conns:  # (a lookup runs the program too: after the counters are read)
            chosen = lb.lookup(c.src, vid.address, c.sport, vid.port)
            assert c.backend == by_address[chosen].role, f"{c}: answered by {c.backend}, the LB holds {chosen}"
    assert len(answered) == len(bed.backends), f"{CONNECTIONS} connections reached only {answered}"
    outer = "decap4" if family == 4 else "decap6"
    assert sum(d[outer] for d in dec.values()) == segments == moved["tx"], (dec, segments, moved)
    assert moved["ct_insert"] == CONNECTIONS
    if bed.decap == "xdp":  # the decap program counts what came in GUE apart
        gue = {b.role: b.gue_total() - gue0[b.role] for b in bed.backends}
        assert sum(gue.values()) == segments
        assert all(gue[r] == dec[r][outer] for r in gue)
    assert not any(bed.csum_errors().values())


def test_a_backend_without_gue_on_that_port_gets_nothing(bed, lb):
    """The control: with the backends' decap programs taking IP-in-IP only, a
    GUE VIP's connections fail, and an IP-in-IP VIP's still work."""
    if bed.decap != "xdp":
        pytest.skip("the control changes the XDP decap programs' GUE port")
    vip = bed.vip4(3)
    try:
        for b in bed.backends:
            decap.set_endpoints(b.program, (b.addr4, b.addr6), gue_port=None)
        with lb.vip(vip, {b.addr4: 1 for b in bed.backends}, encap="gue") as vid:
            with pytest.raises((TestbedError, OSError)):
                bed.clients[0].connect(vid.address, timeout=1.0).ask("hello", timeout=1.0)
        with lb.vip(vip, {b.addr4: 1 for b in bed.backends}) as vid:
            c = bed.clients[0].connect(vid.address)
            assert c.ask("hello") in {b.role for b in bed.backends}
            close_all([c])
    finally:
        for b in bed.backends:
            decap.set_endpoints(b.program, (b.addr4, b.addr6))


def test_tunnel_health_probes_of_a_gue_vip_travel_in_gue(bed, lb):
    """The probes go as the VIP's packets do: in GUE. A backend that stops taking GUE
    is found down while it still takes IP-in-IP; back up when it takes GUE again."""
    if bed.decap != "xdp":
        pytest.skip("the test changes the XDP decap programs' GUE port")
    vip = bed.vip4(5)
    check = pb.HealthCheck(kind="tcp", port=80, interval=0.3, timeout=0.2, rise=2, fall=2, via="tunnel")
    b1 = bed.backends[0]

    def health():
        return {canonical(b.address): (b.health, b.last_result)
                for b in lb.call("GetVip", pb.GetVipRequest(id=vid)).backends}

    with lb.vip(vip, {b.addr4: 1 for b in bed.backends}, encap="gue") as vid:
        lb.call("SetHealthCheck", pb.SetHealthCheckRequest(id=vid, health=check))
        try:
            # the first tunnel check loads the probes' tc program (seconds)
            wait_for(lambda: {v for v in health().values()} == {("up", "connected")}, 30, "every backend up")
            gue0 = {b.role: b.gue_total() for b in bed.backends}
            wait_for(lambda: all(b.gue_total() > gue0[b.role] + 2 for b in bed.backends), 10,
                  "probes arriving in GUE at every backend")
            try:
                decap.set_endpoints(b1.program, (b1.addr4, b1.addr6), gue_port=None)
                wait_for(lambda: health()[b1.addr4][0] == "down", 10, "b1 down without GUE")
                assert all(health()[b.addr4][0] == "up" for b in bed.backends[1:])
            finally:
                decap.set_endpoints(b1.program, (b1.addr4, b1.addr6))
            wait_for(lambda: health()[b1.addr4][0] == "up", 10, "b1 up with GUE again")
        finally:
            lb.call("SetHealthCheck", pb.SetHealthCheckRequest(id=vid, health=pb.HealthCheck(kind="none")))
