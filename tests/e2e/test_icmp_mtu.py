"""ICMP: echo to a VIP, the LB's own address, and path MTU discovery when the
encapsulation would make a packet too big."""
from __future__ import annotations

import socket
import threading

import pytest

from e2e_util import canonical, delta, settle
from l4lb.testbed import MTU


@pytest.mark.parametrize("v", [4, 6])
def test_echo_to_a_vip_is_answered_by_the_lb(bed, lb, v):
    vip = bed.vip4(7) if v == 4 else bed.vip6(7)
    backends = {(b.addr4 if v == 4 else b.addr6): 1 for b in bed.backends}
    with lb.vip(vip, backends):
        c0, d0 = lb.counters(), bed.decap_totals()
        reply = bed.clients[0].ping(vip)
        assert reply is not None, f"no echo reply from {vip}"
        assert canonical(reply["src"]) == canonical(vip) and reply["checksum_ok"]
        assert delta(lb.counters(), c0).get("icmp_echo") == 1, "the LB answered, not a backend"
        assert bed.decap_totals() == d0


def test_traffic_to_the_lbs_own_address_reaches_its_stack(bed, lb):
    """Not a VIP: the program passes it; the LB's kernel answers pings and
    accepts a TCP connection on a socket in the LB's namespace."""
    c0 = lb.counters()
    for addr in (bed.lb.addr4, bed.lb.addr6):
        reply = bed.clients[1].ping(addr)
        assert reply is not None and canonical(reply["src"]) == canonical(addr)
    srv = bed.lb.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind(("::", 8080))
    srv.listen(4)
    got = []

    def accept_two():
        for _ in range(2):
            s, peer = srv.accept()
            got.append(canonical(peer[0].removeprefix("::ffff:")))
            s.sendall(b"lb " + s.recv(100))
            s.close()

    t = threading.Thread(target=accept_two)
    t.start()
    try:
        for addr in (bed.lb.addr4, bed.lb.addr6):
            s = bed.clients[1].socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect((addr, 8080))
            s.sendall(b"hi")
            assert s.recv(100) == b"lb hi"
            s.close()
    finally:
        t.join(timeout=5)
        srv.close()
    assert got == [bed.clients[1].addr4, canonical(bed.clients[1].addr6)]
    assert delta(lb.counters(), c0).get("pass", 0) >= 4 + 2 * 3, "the program passed them"


# case -> (VIP index, IPv6 VIP?, IPv6 backends?, path MTU the client should learn)
TOO_BIG = {"4in4": (8, False, False, MTU - 20), "6in6": (8, True, True, MTU - 40),
           "4in6": (9, False, True, MTU - 40)}


@pytest.mark.parametrize("case", TOO_BIG)
def test_too_big_once_encapsulated_gets_icmp_and_completes_after_pmtu_discovery(bed, lb, case):
    """The client's full-size segments (1500 bytes) would be 1520 or 1540 once
    encapsulated, more than the path after the LB carries: the LB answers
    'fragmentation needed' / 'packet too big' with the MTU left after the
    tunnel header, the client's kernel lowers its path MTU to the VIP and
    resends, and 20 kB go through and come back intact."""
    i, vip6, be6, want_mtu = TOO_BIG[case]
    vip = bed.vip6(i) if vip6 else bed.vip4(i)
    backends = {(b.addr6 if be6 else b.addr4): 1 for b in bed.backends}
    client = bed.clients[-1]
    with lb.vip(vip, backends) as vid:
        assert client.route_mtu(vip) is None, "no path MTU learnt yet"
        c0, p0, s0 = lb.counters(), lb.vip_packets(vid), bed.client_segments()
        conn = client.connect(vip)
        conn.ask("x" * 20000)  # the answer must echo all of it
        assert conn.ask("and a small one") == conn.backend
        conn.close()
        moved = delta(lb.counters(), c0)
        assert moved.get("too_big", 0) >= 1
        assert moved.get("icmp_limited", 0) == 0
        assert client.route_mtu(vip) == want_mtu
        sent = settle(bed.client_segments) - s0
        # every segment the client sent reached the LB; the too-big ones were answered, the rest sent on
        assert settle(lambda: lb.vip_packets(vid)) - p0 == sent
        assert delta(lb.counters(), c0).get("tx", 0) == sent - moved["too_big"]
