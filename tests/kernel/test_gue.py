"""GUE encapsulation (a VIP with encap: gue), proven on the real program in the
kernel (BPF_PROG_TEST_RUN): every combination (4in4, 4in6, 6in6) field by
field, the UDP header (source port from the flow hash, the configured
destination port, length, checksum 0), established flows, too-big with the
UDP header counted, and the Python-predicted backend for 1000 flows per VIP."""
import ipaddress
import random
import struct
from collections import Counter

import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import Ether

from l4lb import flowhash, libbpf, maglev
from l4lb.model import VipKey
from lbfixture import (CLIENT4, CLIENT6, CLIENT_MAC, LB_MAC, PROMOTE, VIP4, VIP6, Flow, gue_source_port,
                       outer_source)
from test_prediction import random_flows

A4, B4, C4 = "198.18.2.1", "198.18.2.2", "198.18.2.3"
A6, B6, C6 = "fd00:198:18:2::1", "fd00:198:18:2::2", "fd00:198:18:2::3"
ENCAP = {"tx": 1, "ct_miss": 1, "ct_insert": 1}
HIT = {"tx": 1, "ct_hit": 1}

KINDS = {  # name: (VIP, client, backend)
    "4in4": (VIP4, CLIENT4, A4),
    "4in6": (VIP4, CLIENT4, A6),
    "6in6": (VIP6, CLIENT6, A6),
}


def _sized(f: Flow, ip_len: int, tcp_flags="A", **ipkw):
    """A packet of the flow whose IP packet is ip_len bytes."""
    head = len(f.ip(**ipkw) / f.l4(tcp_flags))
    return f.packet(tcp_flags, payload=b"\x5a" * (ip_len - head), **ipkw)


@pytest.mark.parametrize("vlan", [None, 100], ids=["untagged", "vlan"])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("kind", KINDS)
def test_gue_vip_packet_is_encapsulated_field_by_field(lb, kind, proto, vlan):
    vip, client, backend = KINDS[kind]
    lb.add_vip(vip, 80, proto, {backend: 1}, encap="gue")
    f = Flow(src=client, dst=vip, proto=proto)
    pkt = f.packet("S", payload=b"first bytes", vlan=vlan)
    r = lb.run(pkt)
    lb.check_encap(r, pkt, backend, f.hash(), encap="gue")
    assert r.moved == ENCAP
    l3 = 18 if vlan is not None else 14
    hdr = 20 if ":" not in backend else 40
    # the same frame, read by scapy: a UDP datagram to the GUE port whose payload is the client's packet
    outer = (IP if hdr == 20 else IPv6)(r.data[l3:])
    assert outer.payload.name == "UDP" and outer.payload.dport == 6080
    assert bytes(outer.payload.payload) == bytes(pkt)[l3:]
    assert lb.ct_entry(f) == lb.index_of(backend)


@pytest.mark.parametrize("kind", KINDS)
def test_established_gue_flow_stays_gue_through_the_connection_table(lb, kind):
    vip, client, backend = KINDS[kind]
    lb.add_vip(vip, 80, "tcp", {backend: 1}, encap="gue")
    f = Flow(src=client, dst=vip)
    assert lb.run(f.packet("S")).moved == ENCAP
    for flags, moved in (("A", PROMOTE), ("PA", HIT), ("FA", HIT)):
        pkt = f.packet(flags, payload=b"x" * 100)
        r = lb.run(pkt)
        assert r.moved == moved
        lb.check_encap(r, pkt, backend, f.hash(), encap="gue")


@pytest.mark.parametrize("vip,client,backend,net", [
    (VIP4, CLIENT4, A4, "encap_v4"), (VIP6, CLIENT6, A6, "encap_v6")])
def test_gue_source_port_comes_from_the_flow_hash_and_spreads(lb, vip, client, backend, net):
    lb.add_vip(vip, 80, "tcp", {backend: 1}, encap="gue")
    prefix = getattr(lb.config, net)
    ports = set()
    l4 = 14 + (20 if prefix.version == 4 else 40)
    for i in range(300):
        f = Flow(src=client, dst=vip, sport=20000 + 7 * i)
        pkt = f.packet("S")
        r = lb.run(pkt)
        lb.check_encap(r, pkt, backend, f.hash(), encap="gue")
        sport = struct.unpack("!H", r.data[l4:l4 + 2])[0]
        assert sport == gue_source_port(f.hash())
        ports.add(sport)
    # 14 bits of hash: 300 flows give (nearly) 300 ports, so a backend's RSS spreads them
    assert len(ports) >= 290


def test_gue_destination_port_is_the_configured_gue_port(lb):
    lb.configure(gue_port=5555)
    lb.add_vip(VIP4, 80, "tcp", {A4: 1}, encap="gue")
    lb.add_vip(VIP6, 80, "tcp", {A6: 1}, encap="gue")
    for f, backend, l4 in ((Flow(), A4, 34), (Flow(src=CLIENT6, dst=VIP6), A6, 54)):
        pkt = f.packet("S")
        r = lb.run(pkt)
        lb.check_encap(r, pkt, backend, f.hash(), encap="gue")
        assert struct.unpack("!H", r.data[l4 + 2:l4 + 4])[0] == 5555


def test_ipip_and_gue_vips_side_by_side_each_keep_their_encapsulation(lb):
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    lb.add_vip(VIP4, 443, "tcp", {A4: 1}, encap="gue")
    plain, gue = Flow(dport=80), Flow(dport=443)
    for flags, moved in (("S", ENCAP), ("A", PROMOTE), ("A", HIT)):
        for f, encap in ((plain, "ipip"), (gue, "gue")):
            pkt = f.packet(flags)
            r = lb.run(pkt)
            assert r.moved == moved
            lb.check_encap(r, pkt, A4, f.hash(), encap=encap)


def test_changing_a_vips_encapsulation_moves_its_established_flows_at_once(lb):
    lb.add_vip(VIP4, 80, "tcp", {A4: 1, B4: 1})
    f = Flow()
    backend = lb.state.backends
    assert lb.run(f.packet("S")).moved == ENCAP
    index = lb.ct_entry(f)[0]
    chosen = next(a for a, b in backend.items() if b.index == index)
    lb.state.set_encap(VipKey.parse(VIP4, 80, "tcp"), "gue")
    pkt = f.packet("A")
    r = lb.run(pkt)
    assert r.moved == PROMOTE  # the same entry, the same backend, the new encapsulation
    lb.check_encap(r, pkt, chosen, f.hash(), encap="gue")
    lb.state.set_encap(VipKey.parse(VIP4, 80, "tcp"), "ipip")
    r = lb.run(pkt)
    assert r.moved == HIT
    lb.check_encap(r, pkt, chosen, f.hash())


# ---- too big: the UDP header counts -------------------------------------------------------


@pytest.mark.parametrize("backend,mtu_field", [(A4, 1472), (A6, 1452)], ids=["4in4", "4in6"])
def test_ipv4_with_df_too_big_for_gue_gets_the_mtu_left_after_ip_and_udp(lb, backend, mtu_field):
    lb.add_vip(VIP4, 80, "tcp", {backend: 1}, encap="gue")
    f = Flow()
    # fits IP-in-IP (mtu_field + 8 bytes), one byte too many for GUE
    pkt = _sized(f, mtu_field + 1, flags="DF")
    r = lb.run(pkt)
    assert r.verdict == "TX"
    assert r.moved == {"too_big": 1, "ct_miss": 1}
    assert lb.ct_count() == 0
    d = r.data
    assert d[0:6] == bytes.fromhex(CLIENT_MAC.replace(":", "")) and d[12:14] == b"\x08\x00"
    reply = IP(d[14:])
    assert (reply.src, reply.dst) == (VIP4, CLIENT4)
    assert (reply[ICMP].type, reply[ICMP].code, reply[ICMP].nexthopmtu) == (3, 4, mtu_field)
    # exactly the MTU left: encapsulated, the outer packet as long as the path takes
    pkt = _sized(f, mtu_field, tcp_flags="S", flags="DF")
    r = lb.run(pkt)
    assert r.moved == ENCAP
    o = lb.check_encap(r, pkt, backend, f.hash(), encap="gue")
    total = struct.unpack("!H", o[2:4])[0] if backend == A4 else 40 + struct.unpack("!H", o[4:6])[0]
    assert total == lb.config.mtu


@pytest.mark.parametrize("mtu,mtu_field", [(1500, 1452), (1320, 1280)], ids=["1500", "clamped-1280"])
def test_ipv6_too_big_for_gue_gets_packet_too_big(lb, mtu, mtu_field):
    lb.configure(mtu=mtu)
    lb.add_vip(VIP6, 80, "tcp", {A6: 1}, encap="gue")
    f = Flow(src=CLIENT6, dst=VIP6)
    pkt = _sized(f, mtu - 47)  # fits 6in6 (mtu - 40), not GUE (mtu - 48)
    r = lb.run(pkt)
    assert r.verdict == "TX"
    assert r.moved == {"too_big": 1, "ct_miss": 1}
    ip6 = IPv6(r.data[14:])
    assert (ip6.src, ip6.dst) == (VIP6, CLIENT6)
    assert ip6[ICMPv6PacketTooBig].mtu == mtu_field
    pkt = _sized(f, mtu - 48, tcp_flags="S")
    r = lb.run(pkt)
    assert r.moved == ENCAP
    lb.check_encap(r, pkt, A6, f.hash(), encap="gue")


def test_icmp_error_about_a_gue_flow_goes_to_its_backend_in_gue(lb):
    lb.add_vip(VIP4, 80, "tcp", {A4: 1, B4: 1, C4: 1}, encap="gue")
    f = Flow()
    assert lb.run(f.packet("S")).moved == ENCAP
    index = lb.ct_entry(f)[0]
    chosen = next(a for a, b in lb.state.backends.items() if b.index == index)
    quote = IP(src=VIP4, dst=CLIENT4) / TCP(sport=80, dport=f.sport, flags="SA")
    err = Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src="198.18.1.1", dst=VIP4) / ICMP(type=3, code=4, nexthopmtu=1400) / bytes(quote)[:28]
    r = lb.run(err)
    assert r.moved == {"tx": 1, "icmp_fwd": 1, "ct_hit": 1}
    inner = bytes(err)
    o = r.data[14:34]
    assert o[9] == 17 and str(ipaddress.ip_address(o[16:20])) == chosen
    udp = r.data[34:42]
    assert struct.unpack("!HHHH", udp)[1:] == (6080, 8 + len(inner) - 14, 0)
    assert r.data[42:] == inner[14:]


# ---- 1000 flows per VIP: the predicted backend, in GUE ---------------------------------------

MIXED = {A4: 1, A6: 2, B4: 3, B6: 1, C4: 1}
V6 = {A6: 1, B6: 1, C6: 2}
FLOWS = 1000
CASES = {  # name: (VIP, port, protocol, backends)
    "v4-tcp-mixed-4in4-4in6": (VIP4, 80, "tcp", MIXED),
    "v4-udp-4in4": ("198.18.10.11", 53, "udp", {A4: 1, B4: 1, C4: 1}),
    "v6-tcp-6in6": (VIP6, 443, "tcp", V6),
}


@pytest.mark.parametrize("name", CASES)
def test_every_fresh_gue_flow_reaches_the_predicted_backend(lb, name):
    vip, port, proto, backends = CASES[name]
    m = lb.capacity.ring_size
    lb.add_vip(vip, port, proto, backends, encap="gue")
    table = maglev.maglev_table(backends, m)
    flows = random_flows(random.Random(f"l4lb gue {name}"), vip, port, proto)
    before = lb.stats()
    dsts = []
    for f in flows:
        h = f.hash()
        sent = bytes(f.packet("S", payload=b"hello"))
        out = libbpf.run(lb.prog.fd, sent).data
        if out[12:14] == b"\x08\x00":
            assert out[23] == 17, "outer protocol UDP"
            dst, src, l4 = out[30:34], out[26:30], 34
            assert str(ipaddress.ip_address(src)) == outer_source(lb.config.encap_v4, h)
        else:
            assert out[20] == 17, "next header UDP"
            dst, src, l4 = out[38:54], out[22:38], 54
            assert int.from_bytes(out[15:18], "big") & 0xFFFFF == h & 0xFFFFF
            assert str(ipaddress.ip_address(src)) == outer_source(lb.config.encap_v6, h)
        assert struct.unpack("!HHHH", out[l4:l4 + 8]) == (gue_source_port(h), 6080, 8 + len(sent) - 14, 0)
        assert out[l4 + 8:] == sent[14:], "inner packet intact"
        dsts.append((str(ipaddress.ip_address(dst)), table[flowhash.ring_slot(h, m)]))
    after = lb.stats()
    want = {"tx": FLOWS, "ct_miss": FLOWS, "ct_insert": FLOWS}
    if proto == "tcp" and lb.syn_evictions(flows):  # SYNs of two flows with one SYN slot
        want["ct_syn_evict"] = lb.syn_evictions(flows)
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == want
    off = [(f, d, w) for f, (d, w) in zip(flows, dsts) if d != w]
    assert not off, f"{len(off)} of {FLOWS} flows off the prediction, e.g. {off[:3]}"
    counts = Counter(d for d, _ in dsts)
    total = sum(backends.values())
    for b, w in backends.items():
        assert abs(counts[b] / FLOWS - w / total) < 0.06, (b, counts[b])
