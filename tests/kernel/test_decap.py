"""The decap program (xdp/decap.c) for backends without tunnel devices: fed
the balancer's own outputs, IP-in-IP and GUE, it gives back the client's
frame, byte for byte except the MACs, which stay those of the tunnel frame."""
import ipaddress

import pytest
from scapy.layers.inet import IP, TCP, UDP, IPOption_NOP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from l4lb import bpf, consts
from l4lb.bpf import percpu_sum
from lbfixture import CLIENT6, GW_MAC, LB_MAC, VIP4, VIP6, Flow, moved

A4, B4 = "198.18.2.1", "198.18.2.2"
A6, B6 = "fd00:198:18:2::1", "fd00:198:18:2::2"
ENCAP_SRC4, ENCAP_SRC6 = "198.18.20.1", "fd00:198:18:20::1"
GUE_PORT = 6080


def tun():
    return Ether(src=LB_MAC, dst=GW_MAC)


class Decap:
    def __init__(self, prog):
        self.prog = prog
        self.addrs = prog.table(consts.MAP_DECAP_ADDRS)
        self.stats_t = prog.table(consts.MAP_DECAP_STATS)
        self.addrs.clear()
        values = self.stats_t[self.stats_t.Key(0)]
        for i in range(len(values)):
            values[i] = self.stats_t.sLeaf()
        self.stats_t[self.stats_t.Key(0)] = values

    def add_address(self, address: str, gue_port: int = GUE_PORT) -> None:
        """A tunnel endpoint; gue_port 0: IP-in-IP only."""
        ip = ipaddress.ip_address(address)
        k = self.addrs.Key()
        packed = ip.packed.ljust(16, b"\0")
        for i in range(4):
            k.addr[i] = int.from_bytes(packed[4 * i:4 * i + 4], "little")  # raw network order
        k.family = consts.FAMILY_V4 if ip.version == 4 else consts.FAMILY_V6
        self.addrs[k] = self.addrs.Leaf(int.from_bytes(gue_port.to_bytes(2, "big"), "little"))  # __be16

    def stats(self) -> dict[str, int]:
        return percpu_sum(self.stats_t)

    def run(self, raw: bytes):
        raw = bytes(raw)
        before = self.stats()
        r = self.prog.run(raw)
        return r.verdict_name, r.data, moved(before, self.stats())


@pytest.fixture(scope="module")
def decap_program():
    prog = bpf.load_decap()
    yield prog
    prog.close()


@pytest.fixture
def decap(decap_program) -> Decap:
    d = Decap(decap_program)
    d.add_address(A4)
    d.add_address(A6)
    return d


KINDS = {"4in4": (VIP4, "198.18.0.5", A4), "4in6": (VIP4, "198.18.0.5", A6), "6in6": (VIP6, CLIENT6, A6)}


@pytest.mark.parametrize("vlan", [None, 100], ids=["untagged", "vlan"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_balancer_output_decapsulates_to_the_client_frame(lb, decap, kind, vlan, proto):
    vip, client, backend = KINDS[kind]
    lb.add_vip(vip, 80, proto, {backend: 1})
    f = Flow(src=client, dst=vip, proto=proto)
    sent = bytes(f.packet("PA", payload=b"request bytes " * 20, vlan=vlan))
    r = lb.run(sent)
    lb.check_encap(r, sent, backend, f.hash())
    verdict, data, counted = decap.run(r.data)
    assert verdict == "PASS"
    assert data == r.data[:12] + sent[12:]  # MACs of the tunnel frame, the rest is the client's
    assert data[:6] == bytes.fromhex(GW_MAC.replace(":", ""))
    assert data[6:12] == bytes.fromhex(LB_MAC.replace(":", ""))
    assert counted == {"decap4" if ":" not in backend else "decap6": 1}


@pytest.mark.parametrize("backend", [A4, A6])
def test_ethernet_padding_survives_the_round_trip(lb, decap, backend):
    lb.add_vip(VIP4, 53, "udp", {backend: 1})
    f = Flow(dport=53, proto="udp")
    sent = bytes(f.packet()) + b"\xc3" * 18
    r = lb.run(sent)
    verdict, data, counted = decap.run(r.data)
    assert verdict == "PASS" and data == r.data[:12] + sent[12:]
    assert counted == {"decap4" if backend == A4 else "decap6": 1}


def test_outer_ipv4_options_are_removed_with_the_header(decap):
    inner = IP(src="198.18.0.5", dst=VIP4) / TCP(sport=40000, dport=80, flags="S")
    tunnel = Ether(src=LB_MAC, dst=GW_MAC) / IP(src=ENCAP_SRC4, dst=A4, proto=4,
                                                options=[IPOption_NOP()] * 8) / inner
    verdict, data, counted = decap.run(tunnel)
    assert verdict == "PASS" and data == bytes(Ether(src=LB_MAC, dst=GW_MAC) / inner)
    assert counted == {"decap4": 1}


@pytest.mark.parametrize("pkt", [
    tun() / IP(src=ENCAP_SRC4, dst=B4, proto=4) / IP(src="198.18.0.5", dst=VIP4) / TCP(),
    tun() / IPv6(src=ENCAP_SRC6, dst=B6, nh=41) / IPv6(src=CLIENT6, dst=VIP6) / TCP(),
    tun() / IPv6(src=ENCAP_SRC6, dst=B6, nh=4) / IP(src="198.18.0.5", dst=VIP4) / TCP(),
    tun() / Dot1Q(vlan=3) / IP(src=ENCAP_SRC4, dst=B4, proto=4) / IP(src="198.18.0.5", dst=VIP4) / UDP(),
], ids=["4in4", "6in6", "4in6", "vlan-4in4"])
def test_tunnel_packet_for_another_host_passes_untouched(decap, pkt):
    verdict, data, counted = decap.run(pkt)
    assert verdict == "PASS" and data == bytes(pkt) and counted == {"pass": 1}


@pytest.mark.parametrize("pkt", [
    tun() / IP(src=ENCAP_SRC4, dst=A4, proto=4) / Raw(b"\x45" + b"\0" * 9),
    tun() / IPv6(src=ENCAP_SRC6, dst=A6, nh=41) / Raw(b"\x60" + b"\0" * 30),
    tun() / IPv6(src=ENCAP_SRC6, dst=A6, nh=4) / Raw(b"\x45" + b"\0" * 10),
    tun() / Dot1Q(vlan=3) / IP(src=ENCAP_SRC4, dst=A4, proto=4, options=[IPOption_NOP()] * 4) /
    Raw(b"\x45" + b"\0" * 18),
], ids=["4in4", "6in6", "4in6", "vlan-options-4in4"])
def test_tunnel_packet_with_a_truncated_inner_header_is_dropped(decap, pkt):
    verdict, _, counted = decap.run(pkt)
    assert verdict == "DROP" and counted == {"malformed": 1}


@pytest.mark.parametrize("pkt", [
    tun() / IP(src="198.18.0.5", dst=A4) / TCP(sport=40000, dport=80),
    tun() / IPv6(src=CLIENT6, dst=A6) / UDP(sport=40000, dport=53),
    tun() / Dot1Q(vlan=9) / IP(src="198.18.0.5", dst=A4) / UDP(),
    tun() / ARP(psrc="198.18.0.5", pdst=A4),
    tun() / IP(src=ENCAP_SRC4, dst=A4, proto=41) / IPv6(src=CLIENT6, dst=VIP6) / TCP(),  # 6in4: not ours
    tun() / IP(src=ENCAP_SRC4, dst=A4, proto=4, flags="MF") / IP(src="198.18.0.5", dst=VIP4) / TCP(),
    tun() / IP(src=ENCAP_SRC4, dst=A4, proto=4, frag=64) / Raw(b"\0" * 40),
], ids=["tcp", "udp6", "vlan-udp", "arp", "6in4", "outer-first-fragment", "outer-later-fragment"])
def test_non_tunnel_traffic_passes_untouched(decap, pkt):
    verdict, data, counted = decap.run(pkt)
    assert verdict == "PASS" and data == bytes(pkt)
    assert counted == {"pass": 1}


# ---- GUE ------------------------------------------------------------------------------------


@pytest.mark.parametrize("vlan", [None, 100], ids=["untagged", "vlan"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_balancer_gue_output_decapsulates_to_the_client_frame(lb, decap, kind, vlan, proto):
    vip, client, backend = KINDS[kind]
    lb.add_vip(vip, 80, proto, {backend: 1}, encap="gue")
    f = Flow(src=client, dst=vip, proto=proto)
    sent = bytes(f.packet("PA", payload=b"request bytes " * 20, vlan=vlan))
    r = lb.run(sent)
    lb.check_encap(r, sent, backend, f.hash(), encap="gue")
    verdict, data, counted = decap.run(r.data)
    assert verdict == "PASS"
    assert data == r.data[:12] + sent[12:]  # MACs of the tunnel frame, the rest is the client's
    assert counted == {"decap4" if ":" not in backend else "decap6": 1, "gue": 1}


def test_gue_padding_survives_the_round_trip_with_another_port(lb, decap):
    lb.configure(gue_port=5555)
    decap.add_address(A4, gue_port=5555)
    lb.add_vip(VIP4, 53, "udp", {A4: 1}, encap="gue")
    f = Flow(dport=53, proto="udp")
    sent = bytes(f.packet()) + b"\xc3" * 18
    r = lb.run(sent)
    verdict, data, counted = decap.run(r.data)
    assert verdict == "PASS" and data == r.data[:12] + sent[12:]
    assert counted == {"decap4": 1, "gue": 1}


def test_gue_with_outer_ipv4_options_and_a_checksum_is_decapsulated(decap):
    inner = IP(src="198.18.0.5", dst=VIP4) / TCP(sport=40000, dport=80, flags="S")
    tunnel = tun() / IP(src=ENCAP_SRC4, dst=A4, options=[IPOption_NOP()] * 8) / \
        UDP(sport=50000, dport=GUE_PORT) / inner  # scapy fills in a UDP checksum: not checked
    assert bytes(tunnel)[14 + 32 + 6:14 + 32 + 8] != b"\0\0"
    verdict, data, counted = decap.run(tunnel)
    assert verdict == "PASS" and data == bytes(tun() / inner)
    assert counted == {"decap4": 1, "gue": 1}


def _gue4(dst=A4, dport=GUE_PORT, inner=None):
    inner = inner if inner is not None else IP(src="198.18.0.5", dst=VIP4) / TCP()
    return tun() / IP(src=ENCAP_SRC4, dst=dst) / UDP(sport=50000, dport=dport, chksum=0) / inner


def _gue6(dst=A6, dport=GUE_PORT, inner=None):
    inner = inner if inner is not None else IPv6(src=CLIENT6, dst=VIP6) / TCP()
    return tun() / IPv6(src=ENCAP_SRC6, dst=dst) / UDP(sport=50000, dport=dport, chksum=0) / inner


@pytest.mark.parametrize("pkt", [
    _gue4(dport=GUE_PORT + 1),
    _gue6(dport=GUE_PORT + 1),
    _gue4(dst=B4),
    _gue6(dst=B6),
    _gue4(inner=Raw(b"\x00\x00\x00\x00" + bytes(IP(src="198.18.0.5", dst=VIP4) / TCP()))),
    _gue6(inner=Raw(b"\x20" + b"\0" * 39)),
    tun() / IP(src=ENCAP_SRC4, dst=A4) / UDP(sport=50000, dport=GUE_PORT, chksum=0),
    tun() / IP(src=ENCAP_SRC4, dst=A4, flags="MF") / UDP(sport=50000, dport=GUE_PORT) / IP() / TCP(),
], ids=["v4-other-port", "v6-other-port", "v4-other-host", "v6-other-host", "variant-0-header",
        "version-2-nibble", "empty-datagram", "outer-fragment"])
def test_udp_that_is_not_gue_for_this_host_passes_untouched(decap, pkt):
    verdict, data, counted = decap.run(pkt)
    assert verdict == "PASS" and data == bytes(pkt) and counted == {"pass": 1}


def test_gue_to_an_address_without_a_gue_port_passes_untouched(decap):
    decap.add_address(A4, gue_port=0)
    pkt = _gue4()
    verdict, data, counted = decap.run(pkt)
    assert verdict == "PASS" and data == bytes(pkt) and counted == {"pass": 1}
    ipip = tun() / IP(src=ENCAP_SRC4, dst=A4, proto=4) / IP(src="198.18.0.5", dst=VIP4) / TCP()
    assert decap.run(ipip)[2] == {"decap4": 1}  # IP-in-IP still taken


@pytest.mark.parametrize("pkt", [
    _gue4(inner=Raw(b"\x45" + b"\0" * 9)),
    _gue6(inner=Raw(b"\x60" + b"\0" * 30)),
    _gue6(inner=Raw(b"\x45" + b"\0" * 10)),
], ids=["4in4", "6in6", "4in6"])
def test_gue_with_a_truncated_inner_header_is_dropped(decap, pkt):
    verdict, _, counted = decap.run(pkt)
    assert verdict == "DROP" and counted == {"malformed": 1}
