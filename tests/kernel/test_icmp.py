"""The ICMP the balancer handles itself: echo replies for VIP addresses,
"fragmentation needed" / "packet too big" for VIP packets that would not fit
the path once encapsulated, and ICMP errors about a VIP flow, which follow the
flow to its backend. Every answer is checked field by field, checksums
recomputed independently."""
import struct

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP
from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest,
                                ICMPv6PacketTooBig, ICMPv6TimeExceeded, IPv6)
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw

from lbfixture import (CLIENT4, CLIENT6, CLIENT_MAC, LB_MAC, ROUTER4, ROUTER6, VIP4, VIP6, Flow,
                       find_flow, inet_csum, ipv4_header_csum, mac, moved, one_cpu)

A4, B4 = "198.18.2.1", "198.18.2.2"
A6, B6 = "fd00:198:18:2::1", "fd00:198:18:2::2"
OTHER4, OTHER6 = "198.18.10.99", "fd00:198:18:10::99"
PASS = {"pass": 1}


def frame(vlan=None):
    eth = Ether(src=CLIENT_MAC, dst=LB_MAC)
    return eth / Dot1Q(vlan=vlan) if vlan is not None else eth


def l3off(raw: bytes) -> int:
    return 18 if raw[12:14] == b"\x81\x00" else 14


# ---- echo ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("vlan", [None, 42], ids=["untagged", "vlan"])
def test_echo_request_to_an_ipv4_vip_address_is_answered(lb, vlan):
    lb.add_vip(VIP4, 443, "tcp", {A4: 1})  # any VIP on the address will do
    req = frame(vlan) / IP(src=CLIENT4, dst=VIP4, ttl=17, tos=0x10, id=777, flags="DF") / \
        ICMP(type=8, id=0x1234, seq=9) / Raw(b"ping payload 0123456789")
    sent = bytes(req)
    r = lb.run(req)
    assert r.verdict == "TX" and r.moved == {"icmp_echo": 1}
    d, off = r.data, l3off(sent)
    assert len(d) == len(sent)
    assert d[0:6] == mac(CLIENT_MAC) and d[6:12] == mac(LB_MAC)
    assert d[12:off] == sent[12:off]  # ethertype (and tag) unchanged
    ip = IP(d[off:])
    assert (ip.version, ip.ihl, ip.tos, ip.len, ip.id, ip.flags, ip.frag) == (4, 5, 0x10, len(sent) - off, 777, 2, 0)
    assert (ip.ttl, ip.proto, ip.src, ip.dst) == (64, 1, VIP4, CLIENT4)
    assert ip.chksum == ipv4_header_csum(d[off:off + 20])
    rebuilt = IP(d[off:])
    del rebuilt.chksum, rebuilt[ICMP].chksum
    rebuilt = IP(bytes(rebuilt))
    assert ip.chksum == rebuilt.chksum and ip[ICMP].chksum == rebuilt[ICMP].chksum  # scapy agrees
    ic = ip[ICMP]
    assert (ic.type, ic.code, ic.id, ic.seq) == (0, 0, 0x1234, 9)
    assert inet_csum(d[off + 20:]) == 0  # the whole message sums to 0xffff
    assert bytes(ic.payload) == b"ping payload 0123456789"


def test_echo_request_to_an_ipv6_vip_address_is_answered(lb):
    lb.add_vip(VIP6, 53, "udp", {A6: 1})
    req = frame() / IPv6(src=CLIENT6, dst=VIP6, hlim=9, tc=0x20, fl=0xABCDE) / \
        ICMPv6EchoRequest(id=0x4321, seq=3, data=b"ping6 payload")
    sent = bytes(req)
    r = lb.run(req)
    assert r.verdict == "TX" and r.moved == {"icmp_echo": 1}
    d = r.data
    assert len(d) == len(sent)
    assert d[0:6] == mac(CLIENT_MAC) and d[6:12] == mac(LB_MAC) and d[12:14] == b"\x86\xdd"
    ip6 = IPv6(d[14:])
    assert (ip6.version, ip6.tc, ip6.fl, ip6.plen, ip6.nh, ip6.hlim) == (6, 0x20, 0xABCDE, len(sent) - 54, 58, 64)
    assert (ip6.src, ip6.dst) == (VIP6, CLIENT6)
    rep = ip6[ICMPv6EchoReply]
    assert (rep.type, rep.code, rep.id, rep.seq, rep.data) == (129, 0, 0x4321, 3, b"ping6 payload")
    rebuilt = IPv6(d[14:])
    del rebuilt[ICMPv6EchoReply].cksum
    assert rep.cksum == IPv6(bytes(rebuilt))[ICMPv6EchoReply].cksum


@pytest.mark.parametrize("pkt", [
    frame() / IP(src=CLIENT4, dst=OTHER4) / ICMP(type=8) / Raw(b"x"),
    frame() / IPv6(src=CLIENT6, dst=OTHER6) / ICMPv6EchoRequest(),
    frame() / IP(src=CLIENT4, dst=VIP4) / ICMP(type=0) / Raw(b"x"),  # a reply is not answered
    frame() / IP(src=CLIENT4, dst=VIP4) / ICMP(type=13),  # timestamp
    frame() / IPv6(src=CLIENT6, dst=VIP6) / ICMPv6EchoReply(),
], ids=["v4-other-address", "v6-other-address", "v4-reply-to-vip", "v4-timestamp", "v6-reply-to-vip"])
def test_icmp_that_is_no_echo_for_a_vip_address_passes_untouched(lb, pkt):
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    lb.add_vip(VIP6, 80, "tcp", {A6: 1})
    r = lb.run(pkt)
    assert r.verdict == "PASS" and r.data == bytes(pkt) and r.moved == PASS


def test_echo_replies_are_rate_limited_per_cpu(lb):
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    lb.configure(icmp_rate=3)
    with one_cpu():
        before = lb.stats()
        verdicts = [lb.run(frame() / IP(src=CLIENT4, dst=VIP4) / ICMP(type=8, seq=i)).verdict for i in range(10)]
        after = lb.stats()
    assert verdicts == ["TX"] * 3 + ["DROP"] * 7
    assert moved(before, after) == {"icmp_echo": 3, "icmp_limited": 7}


def test_truncated_icmp_header_is_dropped_for_a_vip_address_and_passed_otherwise(lb):
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    for dst, verdict, counted in ((VIP4, "DROP", {"malformed": 1}), (OTHER4, "PASS", PASS)):
        pkt = frame() / IP(src=CLIENT4, dst=dst, proto=1) / Raw(b"\x08\x00\x00\x00")
        r = lb.run(pkt)
        assert r.verdict == verdict and r.moved == counted
        if verdict == "PASS":
            assert r.data == bytes(pkt)


# ---- too big ----------------------------------------------------------------------------------

def _sized(f: Flow, ip_len: int, tcp_flags="A", **ipkw):
    """A frame of flow f whose IP packet is ip_len bytes long."""
    head = len(f.ip(**ipkw) / f.l4(tcp_flags))
    return f.packet(tcp_flags, payload=b"\x5a" * (ip_len - head), **ipkw)


@pytest.mark.parametrize("backend,mtu_field", [(A4, 1480), (A6, 1460)], ids=["4in4", "4in6"])
@pytest.mark.parametrize("ihl", [5, 15])
@pytest.mark.parametrize("vlan", [None, 9], ids=["untagged", "vlan"])
def test_ipv4_with_df_too_big_once_encapsulated_gets_fragmentation_needed(lb, backend, mtu_field, ihl, vlan):
    lb.add_vip(VIP4, 80, "tcp", {backend: 1})
    f = Flow()
    opts = {"options": [IPOption_NOP()] * (4 * (ihl - 5))} if ihl > 5 else {}
    ip_len = 1490 if backend == A4 else 1470  # 10 bytes over the 1500-byte MTU once encapsulated
    pkt = _sized(f, ip_len, flags="DF", tos=0x28, **opts)
    if vlan is not None:
        pkt = Ether(src=CLIENT_MAC, dst=LB_MAC) / Dot1Q(vlan=vlan) / pkt[IP]
    sent = bytes(pkt)
    off = l3off(sent)
    assert len(sent) - off == ip_len
    r = lb.run(pkt)
    assert r.verdict == "TX"
    assert r.moved == {"too_big": 1, "ct_miss": 1}  # answered: no connection starts
    assert lb.ct_count() == 0
    d = r.data
    quote = sent[off:off + ihl * 4 + 8]  # the IP header (options and all) and 8 bytes of TCP
    assert len(d) == off + 20 + 8 + len(quote)
    assert d[0:6] == mac(CLIENT_MAC) and d[6:12] == mac(LB_MAC)
    if vlan is not None:
        assert d[12:16] == sent[12:16]
    assert d[off - 2:off] == b"\x08\x00"
    o = d[off:off + 20]
    assert o[0] == 0x45 and o[1] == 0
    assert struct.unpack("!HHH", o[2:8]) == (20 + 8 + len(quote), 0, 0)
    assert (o[8], o[9]) == (64, 1)
    assert struct.unpack("!H", o[10:12])[0] == ipv4_header_csum(o)
    assert o[12:16] == bytes(map(int, VIP4.split("."))) and o[16:20] == bytes(map(int, CLIENT4.split(".")))
    ic = d[off + 20:]
    assert (ic[0], ic[1]) == (3, 4)
    assert struct.unpack("!HH", ic[4:8]) == (0, mtu_field)
    assert ic[8:] == quote
    assert inet_csum(ic) == 0
    rebuilt = IP(d[off:])
    del rebuilt[ICMP].chksum
    assert struct.unpack("!H", ic[2:4])[0] == IP(bytes(rebuilt))[ICMP].chksum


def test_ipv4_without_df_too_big_is_encapsulated_anyway(lb):
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    f = Flow()
    pkt = _sized(f, 1490, flags=0)
    r = lb.run(pkt)
    o = lb.check_encap(r, pkt, A4, f.hash())
    assert struct.unpack("!H", o[2:4])[0] == 1510 and struct.unpack("!H", o[6:8])[0] == 0
    assert r.moved == {"tx": 1, "ct_miss": 1, "ct_insert": 1}


def test_packet_that_just_fits_is_encapsulated(lb):
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    lb.add_vip(VIP6, 80, "tcp", {A6: 1})
    for f, ip_len, backend in ((Flow(), 1480, A4), (Flow(src=CLIENT6, dst=VIP6), 1460, A6)):
        pkt = _sized(f, ip_len, flags="DF") if not f.v6 else _sized(f, ip_len)
        r = lb.run(pkt)
        lb.check_encap(r, pkt, backend, f.hash())


@pytest.mark.parametrize("mtu,mtu_field", [(1500, 1460), (1300, 1280)], ids=["1500", "clamped-1280"])
def test_ipv6_too_big_once_encapsulated_gets_packet_too_big(lb, mtu, mtu_field):
    lb.configure(mtu=mtu)
    lb.add_vip(VIP6, 80, "tcp", {A6: 1})
    f = Flow(src=CLIENT6, dst=VIP6)
    pkt = _sized(f, mtu - 30, tc=0x28)
    sent = bytes(pkt)
    r = lb.run(pkt)
    assert r.verdict == "TX"
    assert r.moved == {"too_big": 1, "ct_miss": 1}
    assert lb.ct_count() == 0
    d = r.data
    quote = sent[14:14 + 48]
    assert len(d) == 14 + 40 + 8 + 48
    assert d[0:6] == mac(CLIENT_MAC) and d[6:12] == mac(LB_MAC) and d[12:14] == b"\x86\xdd"
    ip6 = IPv6(d[14:])
    assert (ip6.version, ip6.tc, ip6.fl, ip6.plen, ip6.nh, ip6.hlim) == (6, 0, 0, 56, 58, 64)
    assert (ip6.src, ip6.dst) == (VIP6, CLIENT6)
    ic = d[54:]
    assert (ic[0], ic[1]) == (2, 0)
    assert struct.unpack("!I", ic[4:8])[0] == mtu_field
    assert ic[8:] == quote
    rebuilt = IPv6(d[14:])
    del rebuilt[ICMPv6PacketTooBig].cksum
    assert struct.unpack("!H", ic[2:4])[0] == IPv6(bytes(rebuilt))[ICMPv6PacketTooBig].cksum
    pseudo = d[22:38] + d[38:54] + struct.pack("!IxxxB", len(ic), 58)  # our own sum too
    assert inet_csum(pseudo + ic) == 0


def test_too_big_answers_share_the_icmp_rate_limit(lb):
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    lb.configure(icmp_rate=2)
    f = Flow()
    with one_cpu():
        before = lb.stats()
        v = [lb.run(_sized(f, 1490, flags="DF")).verdict for _ in range(3)]
        v.append(lb.run(frame() / IP(src=CLIENT4, dst=VIP4) / ICMP(type=8)).verdict)
        after = lb.stats()
    assert v == ["TX", "TX", "DROP", "DROP"]
    assert moved(before, after) == {"too_big": 2, "icmp_limited": 2, "ct_miss": 3}


# ---- ICMP errors about a VIP flow ---------------------------------------------------------------

def _error4(f: Flow, icmp_type=3, code=4, **kw):
    """An ICMP error from a router on the path, about a backend's DSR reply
    (VIP -> client) of flow f."""
    reply = IP(src=f.dst, dst=f.src, ttl=3) / (
        TCP(sport=f.dport, dport=f.sport, flags="SA") if f.proto == "tcp" else UDP(sport=f.dport, dport=f.sport))
    quote = bytes(reply)[:28]
    return frame() / IP(src=ROUTER4, dst=f.dst) / ICMP(type=icmp_type, code=code, **kw) / Raw(quote)


def _error6(f: Flow, kind=ICMPv6PacketTooBig, **kw):
    reply = IPv6(src=f.dst, dst=f.src, hlim=3) / (
        TCP(sport=f.dport, dport=f.sport, flags="SA") if f.proto == "tcp" else UDP(sport=f.dport, dport=f.sport))
    return frame() / IPv6(src=ROUTER6, dst=f.dst) / kind(**kw) / Raw(bytes(reply)[:48])


ERRORS = {
    "v4-frag-needed": (Flow(), A4, lambda f: _error4(f, 3, 4, nexthopmtu=1400)),
    "v4-port-unreachable-udp": (Flow(dport=53, proto="udp"), A4, lambda f: _error4(f, 3, 3)),
    "v4-frag-needed-4in6": (Flow(), A6, lambda f: _error4(f, 3, 4, nexthopmtu=1400)),
    "v6-packet-too-big": (Flow(src=CLIENT6, dst=VIP6), A6, lambda f: _error6(f, ICMPv6PacketTooBig, mtu=1400)),
    "v6-dest-unreachable-udp": (Flow(src=CLIENT6, dst=VIP6, dport=53, proto="udp"), A6,
                                lambda f: _error6(f, ICMPv6DestUnreach, code=1)),
}


@pytest.mark.parametrize("name", ERRORS)
def test_icmp_error_about_a_vip_flow_goes_to_the_flows_backend(lb, name):
    base, backend, make = ERRORS[name]
    other = B4 if backend == A4 else B6
    m = lb.capacity.ring_size
    lb.add_vip(base.dst, base.dport, base.proto, {backend: 1})
    both = {backend: 1, other: 1}
    f = find_flow(both, lambda b: b == other, m, base=base)
    assert lb.run(f.packet("S")).moved == {"tx": 1, "ct_miss": 1, "ct_insert": 1}
    lb.set_backends(f.dst, f.dport, f.proto, both)  # Maglev alone would now say `other`
    err = make(f)
    r = lb.run(err)
    lb.check_encap(r, err, backend, f.hash())  # the whole ICMP packet, inside
    assert r.moved == {"tx": 1, "icmp_fwd": 1, "ct_hit": 1}
    assert lb.ct_count() == 1 and lb.ct_entry(f) == lb.index_of(backend)


@pytest.mark.parametrize("name", ERRORS)
def test_icmp_error_about_an_unknown_flow_takes_the_maglev_pick_and_creates_no_entry(lb, name):
    base, backend, make = ERRORS[name]
    other = B4 if backend == A4 else B6
    both = {backend: 1, other: 1}
    lb.add_vip(base.dst, base.dport, base.proto, both)
    f = find_flow(both, lambda b: b == other, lb.capacity.ring_size, base=base)
    err = make(f)
    r = lb.run(err)
    lb.check_encap(r, err, other, f.hash())
    assert r.moved == {"tx": 1, "icmp_fwd": 1, "ct_miss": 1}
    assert lb.ct_count() == 0


@pytest.mark.parametrize("pkt", [
    # quote from another address than the one the error was sent to
    frame() / IP(src=ROUTER4, dst=VIP4) / ICMP(type=3, code=4) /
    Raw(bytes(IP(src=OTHER4, dst=CLIENT4) / TCP(sport=80, dport=40000))[:28]),
    # quote from the VIP address, but a port with no VIP
    frame() / IP(src=ROUTER4, dst=VIP4) / ICMP(type=3, code=4) /
    Raw(bytes(IP(src=VIP4, dst=CLIENT4) / TCP(sport=81, dport=40000))[:28]),
    # about an ICMP packet, not TCP/UDP
    frame() / IP(src=ROUTER4, dst=VIP4) / ICMP(type=3, code=1) / Raw(bytes(IP(src=VIP4, dst=CLIENT4) / ICMP())[:28]),
    # time exceeded is not handled
    frame() / IP(src=ROUTER4, dst=VIP4) / ICMP(type=11) /
    Raw(bytes(IP(src=VIP4, dst=CLIENT4) / TCP(sport=80, dport=40000))[:28]),
    frame() / IPv6(src=ROUTER6, dst=VIP6) / ICMPv6TimeExceeded() /
    Raw(bytes(IPv6(src=VIP6, dst=CLIENT6) / TCP(sport=80, dport=40000))[:48]),
    # the quote is cut before the ports
    frame() / IP(src=ROUTER4, dst=VIP4) / ICMP(type=3, code=4) /
    Raw(bytes(IP(src=VIP4, dst=CLIENT4) / TCP(sport=80, dport=40000))[:22]),
    frame() / IPv6(src=ROUTER6, dst=VIP6) / ICMPv6PacketTooBig() /
    Raw(bytes(IPv6(src=VIP6, dst=CLIENT6) / TCP(sport=80, dport=40000))[:42]),
    # to another address
    frame() / IP(src=ROUTER4, dst=OTHER4) / ICMP(type=3, code=4) /
    Raw(bytes(IP(src=OTHER4, dst=CLIENT4) / TCP(sport=80, dport=40000))[:28]),
], ids=["quote-from-other-address", "quote-from-other-port", "quote-of-icmp", "v4-time-exceeded",
        "v6-time-exceeded", "v4-quote-cut", "v6-quote-cut", "to-other-address"])
def test_icmp_error_that_is_not_about_a_vip_flow_passes_untouched(lb, pkt):
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    lb.add_vip(VIP6, 80, "tcp", {A6: 1})
    r = lb.run(pkt)
    assert r.verdict == "PASS" and r.data == bytes(pkt) and r.moved == PASS
    assert lb.ct_count() == 0
