"""The balancer's path for TCP and UDP, proven on the real program in the
kernel (BPF_PROG_TEST_RUN): encapsulation field by field, VIP lookup, the
connection table, the new-flow rate limit, and what is dropped or passed.
Every test compares the whole change of the global counters."""
import ipaddress
import os
import random
import struct
import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP
from scapy.layers.inet6 import (IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop,
                                IPv6ExtHdrRouting)
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from l4lb import consts, conntrack, flowhash, libbpf
from lbfixture import (CLIENT4, CLIENT6, CLIENT_MAC, LB_MAC, PROMOTE, VIP4, VIP6, Flow,
                       find_flow, moved, one_cpu, outer_dst, outer_source, predict)

A4, B4, C4 = "198.18.2.1", "198.18.2.2", "198.18.2.3"
A6, B6 = "fd00:198:18:2::1", "fd00:198:18:2::2"
OTHER4 = "198.18.10.99"  # in the VIP range, but no VIP
ENCAP = {"tx": 1, "ct_miss": 1, "ct_insert": 1}  # a fresh flow, encapsulated and remembered
HIT = {"tx": 1, "ct_hit": 1}
PASS = {"pass": 1}


def eth():
    return Ether(src=CLIENT_MAC, dst=LB_MAC)


# ---- encapsulation ---------------------------------------------------------------------------

KINDS = {  # name: (VIP, client, backend)
    "4in4": (VIP4, CLIENT4, A4),
    "4in6": (VIP4, CLIENT4, A6),
    "6in6": (VIP6, CLIENT6, A6),
}


@pytest.mark.parametrize("vlan", [None, 100], ids=["untagged", "vlan"])
@pytest.mark.parametrize("kind", KINDS)
def test_vip_packet_is_encapsulated_field_by_field(lb, kind, vlan):
    vip, client, backend = KINDS[kind]
    lb.add_vip(vip, 80, "tcp", {backend: 1})
    f = Flow(src=client, dst=vip)
    pkt = f.packet("S", payload=b"first bytes", vlan=vlan)
    r = lb.run(pkt)
    lb.check_encap(r, pkt, backend, f.hash())
    assert r.moved == ENCAP
    if vlan is not None:
        assert r.data[12:16] == b"\x81\x00\x00\x64"  # TPID and TCI (VLAN 100) as they came
    assert lb.ct_entry(f) == lb.index_of(backend)


def test_8021ad_tagged_packet_keeps_its_tag(lb):
    lb.add_vip(VIP4, 80, "tcp", {A6: 1})
    f = Flow()
    pkt = Ether(src=CLIENT_MAC, dst=LB_MAC, type=0x88A8) / Dot1Q(vlan=7, prio=5) / f.ip() / f.l4("S")
    r = lb.run(pkt)
    lb.check_encap(r, pkt, A6, f.hash())
    assert r.data[12:18] == bytes(pkt)[12:16] + b"\x86\xdd"
    assert r.moved == ENCAP


@pytest.mark.parametrize("backend", [A4, A6])
def test_ethernet_padding_after_the_ip_packet_is_carried_along(lb, backend):
    lb.add_vip(VIP4, 53, "udp", {backend: 1})
    f = Flow(dport=53, proto="udp")
    raw = bytes(f.packet()) + b"\xa5" * 18  # 42-byte frame padded to the 60-byte minimum
    r = lb.run(raw)
    lb.check_encap(r, raw, backend, f.hash())  # checks the padding follows the inner packet
    assert r.moved == ENCAP
    assert lb.vip_stats(0) == {"packets": 1, "bytes": 60}


@pytest.mark.parametrize("ihl", range(6, 16))
def test_ipv4_options_are_carried_intact_and_ports_found_after_them(lb, ihl):
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    f = Flow()
    pkt = eth() / IP(src=f.src, dst=f.dst, options=[IPOption_NOP()] * (4 * (ihl - 5))) / f.l4("S")
    assert IP(bytes(pkt)[14:]).ihl == ihl
    r = lb.run(pkt)
    lb.check_encap(r, pkt, A4, f.hash())  # the hash (outer source) needs the right ports
    assert r.moved == ENCAP
    assert lb.ct_entry(f) == lb.index_of(A4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tos", [0x00, 0xB8, 0xB9, 0xFF])
def test_tos_and_traffic_class_are_copied_to_the_outer_header(lb, kind, tos):
    vip, client, backend = KINDS[kind]
    lb.add_vip(vip, 80, "tcp", {backend: 1})
    f = Flow(src=client, dst=vip)
    pkt = f.packet("S", tc=tos, fl=0x12345) if f.v6 else f.packet("S", tos=tos)
    r = lb.run(pkt)
    outer = lb.check_encap(r, pkt, backend, f.hash())
    got = outer[1] if ":" not in backend else (struct.unpack("!I", outer[:4])[0] >> 20) & 0xFF
    assert got == tos


@pytest.mark.parametrize("df", [True, False])
def test_df_is_copied_from_the_inner_ipv4_header(lb, df):
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    f = Flow()
    pkt = f.packet("S", flags="DF" if df else 0)
    r = lb.run(pkt)
    outer = lb.check_encap(r, pkt, A4, f.hash())
    assert struct.unpack("!H", outer[6:8])[0] == (0x4000 if df else 0)


@pytest.mark.parametrize("vip,client,backend,net", [
    (VIP4, CLIENT4, A4, "encap_v4"), (VIP6, CLIENT6, A6, "encap_v6")])
def test_outer_source_lies_in_the_prefix_and_varies_by_flow(lb, vip, client, backend, net):
    lb.add_vip(vip, 80, "tcp", {backend: 1})
    prefix = getattr(lb.config, net)
    sources = set()
    for i in range(200):
        f = Flow(src=client, dst=vip, sport=20000 + 7 * i)
        r = lb.run(f.packet("S"))
        o = lb.check_encap(r, f.packet("S"), backend, f.hash())
        src = ipaddress.ip_address(o[12:16] if prefix.version == 4 else o[8:24])
        assert src in prefix and str(src) == outer_source(prefix, f.hash())
        sources.add(src)
    # a /24 gives 8 bits of hash (at most 256 sources), a /64 32 bits
    assert len(sources) >= (100 if prefix.version == 4 else 195)


def test_a_host_prefix_gives_exactly_that_outer_source(lb):
    lb.configure(encap_v4=ipaddress.IPv4Network("198.18.20.7/32"),
                 encap_v6=ipaddress.IPv6Network("fd00:198:18:20::7/128"))
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    lb.add_vip(VIP6, 80, "tcp", {A6: 1})
    for i in range(20):
        for f, backend in ((Flow(sport=30000 + i), A4), (Flow(src=CLIENT6, dst=VIP6, sport=30000 + i), A6)):
            r = lb.run(f.packet("S"))
            o = lb.check_encap(r, f.packet("S"), backend, f.hash())
            src = str(ipaddress.ip_address(o[12:16] if backend == A4 else o[8:24]))
            assert src == ("198.18.20.7" if backend == A4 else "fd00:198:18:20::7")


# ---- VIP lookup --------------------------------------------------------------------------------

def test_portless_vip_takes_any_port_but_only_when_no_exact_vip_matches(lb):
    lb.add_vip(VIP4, 443, "tcp", {B4: 1})
    miss = Flow(dport=22)
    r = lb.run(miss.packet("S"))
    assert r.verdict == "PASS" and r.data == bytes(miss.packet("S")) and r.moved == PASS
    lb.add_vip(VIP4, 0, "tcp", {A4: 1})
    for dport in (22, 80, 8443, 65535, 1):
        f = Flow(dport=dport)
        r = lb.run(f.packet("S"))
        lb.check_encap(r, f.packet("S"), A4, f.hash())
        assert r.moved == ENCAP
    f = Flow(dport=443)
    r = lb.run(f.packet("S"))
    lb.check_encap(r, f.packet("S"), B4, f.hash())
    assert r.moved == ENCAP
    # port-less for TCP only: UDP to the same address has no VIP
    u = Flow(dport=22, proto="udp")
    r = lb.run(u.packet())
    assert r.verdict == "PASS" and r.data == bytes(u.packet()) and r.moved == PASS


def test_udp_vip_is_balanced_and_tcp_to_the_same_port_passes(lb):
    lb.add_vip(VIP6, 53, "udp", {A6: 1})
    f = Flow(src=CLIENT6, dst=VIP6, dport=53, proto="udp")
    pkt = f.packet(payload=b"query")
    r = lb.run(pkt)
    lb.check_encap(r, pkt, A6, f.hash())
    assert r.moved == ENCAP
    r = lb.run(pkt)
    lb.check_encap(r, pkt, A6, f.hash())
    assert r.moved == HIT
    t = f.with_(proto="tcp").packet("S")
    r = lb.run(t)
    assert r.verdict == "PASS" and r.data == bytes(t) and r.moved == PASS


@pytest.mark.parametrize("pkt", [
    eth() / IP(src=CLIENT4, dst=OTHER4) / TCP(sport=40000, dport=80, flags="S"),
    eth() / IP(src=CLIENT4, dst=VIP4) / TCP(sport=40000, dport=81, flags="S"),
    eth() / IP(src=CLIENT4, dst=VIP4) / UDP(sport=40000, dport=80),
    eth() / IPv6(src=CLIENT6, dst="fd00:198:18:10::99") / TCP(sport=40000, dport=80),
    eth() / IP(src=CLIENT4, dst=VIP4, proto=47) / Raw(b"\0" * 8),  # GRE: not balanced
    eth() / IPv6(src=CLIENT6, dst=VIP6, nh=89) / Raw(b"\0" * 8),  # OSPF
    eth() / ARP(psrc=CLIENT4, pdst=VIP4),
    Ether(src=CLIENT_MAC, dst=LB_MAC) / Dot1Q(vlan=5) / Dot1Q(vlan=6) / IP(src=CLIENT4, dst=VIP4) / TCP(dport=80),
    # a VIP's flow, but sent to a group MAC: not the balancer's, never encapsulated
    Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / IP(src=CLIENT4, dst=VIP4) / TCP(sport=40000, dport=80, flags="S"),
    Ether(src=CLIENT_MAC, dst="01:00:5e:00:00:01") / IP(src=CLIENT4, dst=VIP4) / TCP(sport=40000, dport=80, flags="A"),
    Ether(src=CLIENT_MAC, dst="33:33:00:00:00:01") / IPv6(src=CLIENT6, dst=VIP6) / TCP(sport=40000, dport=80, flags="S"),
    Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / IP(src=CLIENT4, dst=VIP4) / ICMP(type=8),
], ids=["other-address", "other-port", "other-protocol", "v6-other-address", "gre", "ospf6", "arp",
        "two-tags", "broadcast-mac", "multicast-mac-v4", "multicast-mac-v6", "echo-to-broadcast-mac"])
def test_packet_for_no_vip_passes_untouched(lb, pkt):
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    lb.add_vip(VIP6, 80, "tcp", {A6: 1})
    r = lb.run(pkt)
    assert r.verdict == "PASS" and r.data == bytes(pkt)
    assert r.moved == PASS
    assert lb.vip_stats(0) == {"packets": 0, "bytes": 0}


def test_unconfigured_program_passes_everything_and_counts_nothing(lb):
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    t = lb.dp.t[consts.MAP_CONFIG]
    t[t.Key(0)] = t.Leaf()  # configured = 0
    pkt = Flow().packet("S")
    r = lb.run(pkt)
    assert r.verdict == "PASS" and r.data == bytes(pkt) and r.moved == {}


# ---- connection table --------------------------------------------------------------------------

def test_second_packet_of_a_flow_hits_the_connection_table(lb):
    backends = {A4: 1, B4: 1, A6: 1}
    lb.add_vip(VIP4, 80, "tcp", backends)
    f = Flow()
    want = predict(backends, f, lb.capacity.ring_size)
    r = lb.run(f.packet("S"))
    lb.check_encap(r, f.packet("S"), want, f.hash())
    assert r.moved == ENCAP
    assert lb.in_syn_table(f)
    entry = lb.ct_entry(f)
    for flags, counters in (("A", PROMOTE), ("PA", HIT), ("FA", HIT)):
        r = lb.run(f.packet(flags, payload=b"data"))
        lb.check_encap(r, f.packet(flags, payload=b"data"), want, f.hash())
        assert r.moved == counters
        # the first packet after the SYN moved the entry into the buckets
        assert not lb.in_syn_table(f) and lb.ct_entry(f) == entry
    assert lb.ct_count() == 1


def test_syn_takes_a_fresh_pick_even_with_a_cached_flow(lb):
    m = lb.capacity.ring_size
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    new = {A4: 1, B4: 1}
    f = find_flow(new, lambda b: b == B4, m)
    g = find_flow(new, lambda b: b == B4, m, start=f.sport + 1)
    for flow in (f, g):
        assert lb.run(flow.packet("S")).moved == ENCAP
        assert lb.ct_entry(flow) == lb.index_of(A4)
    lb.set_backends(VIP4, 80, "tcp", new)  # Maglev now sends f and g to B4
    r = lb.run(f.packet("S"))  # a SYN again (a new connection on the same 5-tuple)
    lb.check_encap(r, f.packet("S"), B4, f.hash())
    assert r.moved == ENCAP
    assert lb.ct_entry(f) == lb.index_of(B4)
    r = lb.run(f.packet("A"))  # the SYN's entry is newer than the one in the buckets
    lb.check_encap(r, f.packet("A"), B4, f.hash())
    assert r.moved == PROMOTE
    r = lb.run(f.packet("A"))  # and it replaced that one
    lb.check_encap(r, f.packet("A"), B4, f.hash())
    assert r.moved == HIT and lb.ct_entry(f) == lb.index_of(B4)
    r = lb.run(g.packet("A"))  # the established flow stays where it was
    lb.check_encap(r, g.packet("A"), A4, g.hash())
    assert r.moved == PROMOTE
    r = lb.run(g.packet("SA"))  # SYN-ACK is not a new connection: the entry holds
    lb.check_encap(r, g.packet("SA"), A4, g.hash())
    assert r.moved == HIT


@pytest.mark.parametrize("flags", ["R", "RA"])
def test_rst_never_creates_an_entry(lb, flags):
    backends = {A4: 1, B4: 1}
    lb.add_vip(VIP4, 80, "tcp", backends)
    f = Flow()
    r = lb.run(f.packet(flags))
    lb.check_encap(r, f.packet(flags), predict(backends, f, lb.capacity.ring_size), f.hash())
    assert r.moved == {"tx": 1, "ct_miss": 1}
    assert lb.ct_count() == 0


def test_rst_of_an_established_flow_follows_its_entry(lb):
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    f = find_flow({A4: 1, B4: 1}, lambda b: b == B4, lb.capacity.ring_size)
    lb.run(f.packet("S"))
    lb.set_backends(VIP4, 80, "tcp", {A4: 1, B4: 1})
    r = lb.run(f.packet("RA"))
    lb.check_encap(r, f.packet("RA"), A4, f.hash())
    assert r.moved == PROMOTE


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_entry_made_on_one_cpu_is_hit_on_another(lb):
    # one table for all CPUs: on veth a flow's packets run XDP on the sender's CPU
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    f = find_flow({A4: 1, B4: 1}, lambda b: b == B4, lb.capacity.ring_size)
    first, second = sorted(os.sched_getaffinity(0))[:2]
    saved = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {first})
        assert lb.run(f.packet("S")).moved == ENCAP
        lb.set_backends(VIP4, 80, "tcp", {A4: 1, B4: 1})
        os.sched_setaffinity(0, {second})
        r = lb.run(f.packet("A"))
    finally:
        os.sched_setaffinity(0, saved)
    lb.check_encap(r, f.packet("A"), A4, f.hash())
    assert r.moved == PROMOTE


def test_hit_on_a_backend_removed_from_this_vip_but_kept_by_another_re_picks(lb):
    m = lb.capacity.ring_size
    lb.add_vip(VIP4, 53, "udp", {A4: 1, B4: 1})
    lb.add_vip(VIP4, 53, "tcp", {A4: 1})  # the same host serves DNS over TCP
    f = find_flow({A4: 1, B4: 1}, lambda b: b == A4, m, base=Flow(dport=53, proto="udp"))
    assert lb.run(f.packet()).moved == ENCAP
    lb.set_backends(VIP4, 53, "udp", {B4: 1})
    r = lb.run(f.packet())
    lb.check_encap(r, f.packet(), B4, f.hash())
    assert r.moved == {"tx": 1, "ct_stale": 1, "ct_miss": 1, "ct_insert": 1}


def test_no_conntrack_vip_never_reads_or_writes_the_table(lb):
    backends = {A4: 1, B4: 1, C4: 1}
    lb.add_vip(VIP4, 80, "tcp", backends, flags=["no_conntrack"])
    m = lb.capacity.ring_size
    f = Flow()
    want = predict(backends, f, m)
    other = next(b for b in backends if b != want)
    for flags in ("S", "A", "PA", "A"):
        r = lb.run(f.packet(flags))
        lb.check_encap(r, f.packet(flags), want, f.hash())
        assert r.moved == {"tx": 1, "ct_miss": 1}
    assert lb.ct_count() == 0
    lb.ct_put(f, *lb.index_of(other))  # an entry it must not read
    r = lb.run(f.packet("A"))
    lb.check_encap(r, f.packet("A"), want, f.hash())
    assert r.moved == {"tx": 1, "ct_miss": 1}


def test_no_source_port_vip_sends_flows_differing_only_in_sport_to_one_backend(lb):
    backends = {A4: 1, B4: 1, C4: 1, A6: 1}
    m = lb.capacity.ring_size
    lb.add_vip(VIP4, 443, "udp", backends, flags=["no_source_port"])
    lb.add_vip(VIP4, 444, "udp", backends)  # the same without the flag: the control
    base = Flow(dport=443, proto="udp")
    want = predict(backends, base, m, no_sport=True)
    spread = set()
    for i in range(40):
        f = base.with_(sport=1024 + 997 * i)
        r = lb.run(f.packet())
        lb.check_encap(r, f.packet(), want, f.hash(no_sport=True))
        assert r.moved == ENCAP
        c = f.with_(dport=444)
        r = lb.run(c.packet())
        spread.add(outer_dst(r.data))
    assert len(spread) == len(backends)
    assert lb.ct_count() == 80  # entries stay per 5-tuple


def test_client_affinity_vips_send_every_flow_of_a_client_to_one_backend(lb):
    """Port-less TCP and UDP VIPs of one address with the same backends and
    client_affinity: whatever the ports and the protocol, a client's flows
    reach one backend; other clients spread over all of them."""
    backends = {A4: 1, B4: 1, C4: 1, A6: 1}
    m = lb.capacity.ring_size
    for proto in ("tcp", "udp"):
        lb.add_vip(VIP4, 0, proto, backends, flags=["client_affinity"])
    lb.add_vip("198.18.10.44", 0, "tcp", backends)  # the same without the flag: the control
    rnd = random.Random(7)
    chosen = set()
    for client in range(1, 41):
        base = Flow(src=f"198.18.0.{client}")
        want = predict(backends, base, m, flags=["client_affinity"])
        chosen.add(want)
        spread = set()
        for _ in range(6):
            f = base.with_(sport=rnd.randrange(1024, 65536), dport=rnd.randrange(1, 65536),
                           proto=rnd.choice(["tcp", "udp"]))
            pkt = f.packet("S") if f.proto == "tcp" else f.packet()
            r = lb.run(pkt)
            lb.check_encap(r, pkt, want, f.hash(flags=["client_affinity"]))
            c = f.with_(dst="198.18.10.44", proto="tcp")
            spread.add(outer_dst(lb.run(c.packet("S")).data))
        assert len(spread) > 1, client  # six ports of one client without the flag: several backends
    assert chosen == set(backends)


def test_hit_on_a_removed_backend_takes_a_fresh_pick(lb):
    m = lb.capacity.ring_size
    lb.add_vip(VIP4, 80, "tcp", {A4: 1, B4: 1})
    f = find_flow({A4: 1, B4: 1}, lambda b: b == A4, m)
    lb.run(f.packet("S"))
    old = lb.index_of(A4)
    assert lb.ct_entry(f) == old
    lb.set_backends(VIP4, 80, "tcp", {B4: 1})
    r = lb.run(f.packet("A"))
    lb.check_encap(r, f.packet("A"), B4, f.hash())
    assert r.moved == {"tx": 1, "ct_stale": 1, "ct_miss": 1, "ct_insert": 1}
    assert lb.ct_entry(f) == lb.index_of(B4)
    assert lb.run(f.packet("A")).moved == HIT


def test_hit_on_a_reused_backend_index_with_a_new_generation_takes_a_fresh_pick(lb):
    m = lb.capacity.ring_size
    lb.few_backend_indices(2)
    final = {B4: 1, C4: 1}
    f = find_flow(final, lambda b: b == B4, m)
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    lb.run(f.packet("S"))
    assert lb.ct_entry(f) == lb.index_of(A4) == (1, 1)
    lb.set_backends(VIP4, 80, "tcp", {B4: 1})  # B4 takes index 2, A4 leaves index 1
    lb.set_backends(VIP4, 80, "tcp", final)  # C4 reuses index 1
    assert lb.index_of(C4) == (1, 2) and lb.index_of(B4) == (2, 1)
    r = lb.run(f.packet("A"))  # the entry names index 1, generation 1: not C4
    lb.check_encap(r, f.packet("A"), B4, f.hash())
    assert r.moved == {"tx": 1, "ct_stale": 1, "ct_miss": 1, "ct_insert": 1}
    assert lb.ct_entry(f) == (2, 1)


def test_drained_backend_gets_no_new_flows_but_keeps_established_ones(lb):
    m = lb.capacity.ring_size
    lb.add_vip(VIP4, 80, "tcp", {A4: 1, B4: 1})
    f = find_flow({A4: 1, B4: 1}, lambda b: b == A4, m)
    lb.run(f.packet("S"))
    lb.set_backends(VIP4, 80, "tcp", {A4: 0, B4: 1})
    r = lb.run(f.packet("A"))
    lb.check_encap(r, f.packet("A"), A4, f.hash())
    assert r.moved == PROMOTE
    for i in range(50):
        g = Flow(sport=50000 + i)
        r = lb.run(g.packet("S"))
        lb.check_encap(r, g.packet("S"), B4, g.hash())
        assert r.moved == ENCAP
    r = lb.run(f.packet("S"))  # the drained backend's own flow, reconnecting
    lb.check_encap(r, f.packet("S"), B4, f.hash())


def test_udp_entry_expires_after_the_udp_timeout_and_re_picks(lb):
    m = lb.capacity.ring_size
    lb.configure(udp_timeout_s=0.1)
    lb.add_vip(VIP4, 53, "udp", {A4: 1})
    both = {A4: 1, B4: 1}
    f = find_flow(both, lambda b: b == B4, m, base=Flow(dport=53, proto="udp"))
    t0 = time.monotonic()
    assert lb.run(f.packet()).moved == ENCAP
    lb.set_backends(VIP4, 53, "udp", both)  # Maglev now sends f to B4
    for pause in (0, 0.06, 0.06):  # each hit refreshes the entry: 120 ms > the timeout in all
        time.sleep(pause)
        r = lb.run(f.packet())
        lb.check_encap(r, f.packet(), A4, f.hash())
        assert r.moved == HIT
    assert time.monotonic() - t0 > 0.1
    time.sleep(0.15)
    r = lb.run(f.packet())
    lb.check_encap(r, f.packet(), B4, f.hash())
    assert r.moved == {"tx": 1, "ct_stale": 1, "ct_miss": 1, "ct_insert": 1}
    r = lb.run(f.packet())
    lb.check_encap(r, f.packet(), B4, f.hash())
    assert r.moved == HIT


def test_tcp_entry_does_not_expire_with_the_udp_timeout(lb):
    lb.configure(udp_timeout_s=0.01)
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    f = Flow()
    lb.run(f.packet("S"))
    time.sleep(0.03)
    assert lb.run(f.packet("A")).moved == PROMOTE  # in the SYN table
    time.sleep(0.03)
    assert lb.run(f.packet("A")).moved == HIT  # in the buckets


def test_new_flows_above_the_rate_limit_are_forwarded_without_an_entry(lb):
    backends = {A4: 1, B4: 1, A6: 1}
    lb.add_vip(VIP4, 80, "tcp", backends)
    lb.configure(new_flow_rate=5)
    flows = [Flow(sport=30000 + i) for i in range(20)]
    with one_cpu():
        before = lb.stats()
        for f in flows:
            r = lb.run(f.packet("S"))
            lb.check_encap(r, f.packet("S"), predict(backends, f, lb.capacity.ring_size), f.hash())
        after = lb.stats()
    assert moved(before, after) == {
        "tx": 20, "ct_miss": 20, "ct_insert": 5, "ct_limited": 15}
    assert [lb.ct_entry(f) is not None for f in flows] == [True] * 5 + [False] * 15
    assert lb.ct_count() == 5


def _possible_cpus() -> int:
    with open("/sys/devices/system/cpu/possible") as fh:
        n = 0
        for part in fh.read().strip().split(","):
            lo, _, hi = part.partition("-")
            n += int(hi or lo) - int(lo) + 1
    return n


def _handshake_flood(lb, n: int, first: int) -> None:
    """n new connections (SYN, then ACK) from clients 198.18.0.<first>, ...
    The frames are made once with scapy; only the source port and the last
    address byte change per flow (the data plane reads no L4 checksum)."""
    syn = bytearray(bytes(Flow(src=f"198.18.0.{first}").packet("S")))
    ack = bytearray(bytes(Flow(src=f"198.18.0.{first}").packet("A")))
    for i in range(n):
        for frame in (syn, ack):
            struct.pack_into("!H", frame, 34, 1024 + i % 60000)
            frame[29] = first + i // 60000
            assert libbpf.run(lb.prog.fd, bytes(frame)).verdict == libbpf.XDP_TX


def _buckets_of(lb, f: Flow) -> tuple[int, int]:
    """The flow's two connection-table buckets (xdp/conntrack.h)."""
    t = lb.dp.conntrack_table(consts.FAMILY_V6 if f.v6 else consts.FAMILY_V4)
    h = conntrack.key_hash(bytes(lb._flow_key(f)))
    return conntrack.bucket1(h, t.buckets), conntrack.bucket2(h, t.buckets)


def _flows_with_first_bucket(lb, bucket: int, n: int, avoid=()) -> list[Flow]:
    """n flows (TCP from 198.18.0.100-250 to VIP4:80) whose first bucket is `bucket`."""
    buckets = lb.dp.conntrack_table(consts.FAMILY_V4).buckets
    out = []
    for host in range(100, 251):
        src = f"198.18.0.{host}"
        for sport in range(1024, 65536):
            h = conntrack.key_hash(flowhash.flow_bytes(src, VIP4, sport, 80, 6))
            if conntrack.bucket1(h, buckets) == bucket and (src, sport) not in avoid:
                out.append(Flow(src=src, sport=sport))
                if len(out) == n:
                    return out
    raise AssertionError(f"fewer than {n} flows with first bucket {bucket}")


def _handshake(lb, f: Flow) -> dict:
    """SYN, then ACK: the counters both moved (the ACK's entry write is the one
    that may evict)."""
    syn = lb.run(f.packet("S")).moved
    ack = lb.run(f.packet("A")).moved
    assert {k: v for k, v in ack.items() if k != "ct_evict"} == PROMOTE
    return {k: syn.get(k, 0) + ack.get(k, 0) for k in syn.keys() | ack.keys()}


def test_flood_of_new_flows_does_not_evict_established_entries(lb):
    # A new flow whose two buckets are both full replaces the oldest flow in
    # them: flows made to land in an established flow's buckets evict it, unless
    # the new-flow rate limit keeps them out.
    lb.add_vip(VIP4, 80, "tcp", {A4: 1, B4: 1})
    established = Flow(sport=1000)
    first, _ = _buckets_of(lb, established)
    with one_cpu():
        lb.configure(new_flow_rate=0)
        lb.run(established.packet("S"))
        lb.run(established.packet("A"))
        # more flows fill the established flow's first bucket; another one with
        # that first bucket, and its second bucket filled by flows of their own
        ways = consts.CT_WAYS
        fill = _flows_with_first_bucket(lb, first, ways)
        last = fill.pop()
        other = _flows_with_first_bucket(lb, _buckets_of(lb, last)[1], ways,
                                         avoid={(f.src, f.sport) for f in fill + [last]})
        for f in fill + other:
            assert _handshake(lb, f)["ct_insert"] == 1
        assert lb.ct_entry(established) is not None
        moved = _handshake(lb, last)
        assert moved["ct_insert"] == 1 and moved["ct_evict"] == 1
        assert lb.ct_entry(established) is None, "without the limit the new flow evicts it"
        assert all(lb.ct_entry(f) is not None for f in fill + other + [last])

        n = 40000
        lb.configure(new_flow_rate=5)
        assert lb.run(established.packet("S")).moved["ct_insert"] == 1
        assert lb.run(established.packet("A")).moved == PROMOTE
        before, t0 = lb.stats(), time.monotonic()
        _handshake_flood(lb, n, first=100)
        after, seconds = lb.stats(), time.monotonic() - t0
    assert lb.ct_entry(established) is not None
    assert lb.run(established.packet("A")).moved == HIT
    assert after["ct_insert"] - before["ct_insert"] <= 5 * (int(seconds) + 2)  # 5 per window
    assert after["tx"] - before["tx"] == 2 * n


def test_a_syn_flood_into_full_buckets_replaces_no_flow(lb):
    # the same full buckets as above; SYNs of flows with those buckets, rate
    # limit off, write only the SYN table: every answered flow stays, and only
    # a flow whose handshake goes on takes a way (the oldest)
    lb.add_vip(VIP4, 80, "tcp", {A4: 1, B4: 1})
    established = Flow(sport=1000)
    first, _ = _buckets_of(lb, established)
    lb.configure(new_flow_rate=0)
    _handshake(lb, established)
    fill = _flows_with_first_bucket(lb, first, consts.CT_WAYS)
    last = fill.pop()
    other = _flows_with_first_bucket(lb, _buckets_of(lb, last)[1], consts.CT_WAYS,
                                     avoid={(f.src, f.sport) for f in fill + [last]})
    for f in fill + other:
        _handshake(lb, f)
    flood = _flows_with_first_bucket(lb, first, 64, avoid={(f.src, f.sport) for f in fill + other + [last]})
    before = lb.stats()
    for f in flood:
        assert lb.run(f.packet("S")).moved["ct_insert"] == 1
    moved = {k: v - before[k] for k, v in lb.stats().items() if v != before[k]}
    assert moved.get("ct_evict", 0) == 0 and moved["ct_insert"] == len(flood)
    assert moved.get("ct_syn_evict", 0) == lb.syn_evictions(flood)
    assert all(lb.ct_entry(f) is not None and not lb.in_syn_table(f)
               for f in [established] + fill + other)
    moved = _handshake(lb, last)
    assert moved["ct_insert"] == 1 and moved["ct_evict"] == 1
    assert lb.ct_entry(established) is None, "the oldest answered flow made way"
    assert all(lb.ct_entry(f) is not None for f in fill + other + [last])


# ---- fragments, extension headers, malformed -------------------------------------------------

@pytest.mark.parametrize("frag", [{"flags": "MF"}, {"frag": 100}, {"flags": "MF", "frag": 5}],
                         ids=["first", "last", "middle"])
@pytest.mark.parametrize("dst", [VIP4, OTHER4])
def test_ipv4_fragment_to_a_vip_address_is_dropped_and_to_others_passed(lb, frag, dst):
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    for l4 in (TCP(sport=40000, dport=80), UDP(sport=40000, dport=5353)):
        pkt = eth() / IP(src=CLIENT4, dst=dst, **frag) / l4
        r = lb.run(pkt)
        if dst == VIP4:
            assert r.verdict == "DROP" and r.moved == {"fragment": 1}
        else:
            assert r.verdict == "PASS" and r.data == bytes(pkt) and r.moved == PASS
    assert lb.vip_stats(0) == {"packets": 0, "bytes": 0}


@pytest.mark.parametrize("ext", [IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, IPv6ExtHdrFragment,
                                 IPv6ExtHdrDestOpt])
@pytest.mark.parametrize("dst", [VIP6, "fd00:198:18:10::99"])
def test_ipv6_extension_header_to_a_vip_address_is_dropped_and_to_others_passed(lb, ext, dst):
    lb.add_vip(VIP6, 80, "tcp", {A6: 1})
    pkt = eth() / IPv6(src=CLIENT6, dst=dst) / ext() / TCP(sport=40000, dport=80, flags="S")
    r = lb.run(pkt)
    if dst == VIP6:
        assert r.verdict == "DROP" and r.moved == {"ext_header": 1}
    else:
        assert r.verdict == "PASS" and r.data == bytes(pkt) and r.moved == PASS


def _ip4(dst=VIP4, **kw):
    return bytes(eth() / IP(src=CLIENT4, dst=dst, **kw) / TCP(sport=40000, dport=80, flags="S"))


def _set(raw: bytes, offset: int, value: bytes) -> bytes:
    return raw[:offset] + value + raw[offset + len(value):]


MALFORMED_ANY_DST = {  # dropped whatever the destination: the IP header itself is broken
    "vlan-tag-cut": bytes(Ether(src=CLIENT_MAC, dst=LB_MAC, type=0x8100)) + b"\x00\x64",
    "ipv4-header-cut": _ip4()[:14 + 12],
    "ipv4-version-6": _set(_ip4(), 14, b"\x65"),
    "ihl-4": _set(_ip4(), 14, b"\x44"),
    "tot_len-beyond-frame": _set(_ip4(), 16, struct.pack("!H", 41)),
    "tot_len-below-ihl": _set(_ip4(), 16, struct.pack("!H", 19)),
    "ihl-beyond-tot_len": _set(_ip4(), 14, b"\x4f"),  # 60-byte header, tot_len 40
    "ipv6-header-cut": bytes(eth() / IPv6(src=CLIENT6, dst=VIP6) / TCP())[:14 + 39],
    "ipv6-version-4": _set(bytes(eth() / IPv6(src=CLIENT6, dst=VIP6) / TCP()), 14, b"\x40"),
    "payload_len-beyond-frame": _set(bytes(eth() / IPv6(src=CLIENT6, dst=VIP6) / TCP()), 18,
                                     struct.pack("!H", 21)),
}


@pytest.mark.parametrize("name", MALFORMED_ANY_DST)
@pytest.mark.parametrize("to_vip", [True, False], ids=["vip", "other"])
def test_malformed_ethernet_or_ip_header_is_dropped(lb, name, to_vip):
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    lb.add_vip(VIP6, 80, "tcp", {A6: 1})
    raw = MALFORMED_ANY_DST[name]
    if not to_vip:  # point the destination elsewhere (where the header has one)
        raw = raw.replace(ipaddress.ip_address(VIP4).packed, ipaddress.ip_address(OTHER4).packed)
        raw = raw.replace(ipaddress.ip_address(VIP6).packed,
                          ipaddress.ip_address("fd00:198:18:10::99").packed)
    r = lb.run(raw)
    assert r.verdict == "DROP" and r.moved == {"malformed": 1}


def _cut_l4(ip_layer, l4_bytes: bytes, tail: bytes = b"") -> bytes:
    """An IP packet whose L4 header is cut short (the IP length agrees), and
    optionally more bytes in the frame after what the IP length covers."""
    return bytes(eth() / ip_layer / Raw(l4_bytes)) + tail


TCP_HEAD = bytes(TCP(sport=40000, dport=80, flags="S"))
UDP_HEAD = bytes(UDP(sport=40000, dport=80))
SHORT_L4 = {
    "tcp-10-bytes": lambda d: _cut_l4(IP(src=CLIENT4, dst=d, proto=6), TCP_HEAD[:10]),
    "tcp-cut-by-ip-length": lambda d: _cut_l4(IP(src=CLIENT4, dst=d, proto=6), TCP_HEAD[:19],
                                              TCP_HEAD[19:] + b"\0" * 10),
    "udp-4-bytes": lambda d: _cut_l4(IP(src=CLIENT4, dst=d, proto=17), UDP_HEAD[:4]),
    "udp-cut-by-ip-length": lambda d: _cut_l4(IP(src=CLIENT4, dst=d, proto=17), UDP_HEAD[:7],
                                              UDP_HEAD[7:] + b"\0" * 20),
    "tcp6-10-bytes": lambda d: _cut_l4(IPv6(src=CLIENT6, dst=d, nh=6), TCP_HEAD[:10]),
    "udp6-7-bytes": lambda d: _cut_l4(IPv6(src=CLIENT6, dst=d, nh=17), UDP_HEAD[:7]),
}


@pytest.mark.parametrize("name", SHORT_L4)
def test_truncated_tcp_or_udp_header_is_dropped_for_a_vip_address_and_passed_otherwise(lb, name):
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    lb.add_vip(VIP4, 80, "udp", {A4: 1})
    lb.add_vip(VIP6, 80, "tcp", {A6: 1})
    lb.add_vip(VIP6, 80, "udp", {A6: 1})
    v6 = name.startswith(("tcp6", "udp6"))
    raw = SHORT_L4[name](VIP6 if v6 else VIP4)
    r = lb.run(raw)
    assert r.verdict == "DROP" and r.moved == {"malformed": 1}
    raw = SHORT_L4[name]("fd00:198:18:10::99" if v6 else OTHER4)
    r = lb.run(raw)
    assert r.verdict == "PASS" and r.data == raw and r.moved == PASS


# ---- no backend, per-VIP counters ---------------------------------------------------------------

@pytest.mark.parametrize("backends", [{}, {A4: 0, B4: 0}], ids=["none", "all-drained"])
def test_vip_without_a_backend_drops_and_counts_no_backend(lb, backends):
    lb.add_vip(VIP4, 80, "tcp", backends)
    f = Flow()
    for flags in ("S", "A"):
        r = lb.run(f.packet(flags))
        assert r.verdict == "DROP" and r.moved == {"ct_miss": 1, "no_backend": 1}
    assert lb.ct_count() == 0
    assert lb.vip_stats(0) == {"packets": 2, "bytes": 2 * len(f.packet("S"))}


def test_per_vip_counters_count_packets_and_frame_bytes(lb):
    a = lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    b = lb.add_vip(VIP6, 443, "udp", {A6: 1})
    fa, fb = Flow(), Flow(src=CLIENT6, dst=VIP6, dport=443, proto="udp")
    sent_a = [fa.packet("S"), fa.packet("A", payload=b"x" * 100), fa.packet("A", vlan=3, payload=b"y" * 7)]
    sent_b = [fb.packet(payload=b"z" * 1000), fb.packet()]
    for p in sent_a + sent_b:
        assert lb.run(p).verdict == "TX"
    assert lb.run(eth() / IP(src=CLIENT4, dst=OTHER4) / TCP(dport=80)).verdict == "PASS"
    assert lb.vip_stats(a.vip_id) == {"packets": 3, "bytes": sum(len(p) for p in sent_a)}
    assert lb.vip_stats(b.vip_id) == {"packets": 2, "bytes": sum(len(p) for p in sent_b)}
    assert lb.stats() == {**{k: 0 for k in lb.stats()}, "tx": 5, "ct_miss": 2, "ct_insert": 2,
                          "ct_hit": 3, "ct_promote": 1, "pass": 1}


def test_user_space_sees_the_syn_table_and_the_buckets_as_one_table(lb):
    lb.add_vip(VIP4, 80, "tcp", {A4: 1})
    f = find_flow({A4: 1, B4: 1}, lambda b: b == B4, lb.capacity.ring_size)
    g = Flow(sport=f.sport + 1)
    _handshake(lb, f)  # f in the buckets, to A4
    lb.set_backends(VIP4, 80, "tcp", {A4: 1, B4: 1})
    assert lb.run(f.packet("S")).moved == ENCAP  # f again, to B4: in the SYN table too
    assert lb.run(g.packet("S")).moved == ENCAP  # g only in the SYN table
    t = lb.dp.conntrack_table(consts.FAMILY_V4)
    assert lb.in_syn_table(f) and lb.in_syn_table(g)
    assert len(t) == 2 and lb.ct_count() == 2, "a flow in both counts once"
    assert lb.ct_entry(f) == lb.index_of(B4), "the SYN table's entry is the newer"
    assert {bytes(k): v.backend for k, v in t.items()}[bytes(lb._flow_key(f))] == lb.index_of(B4)[0]
    del t[lb._flow_key(f)]
    assert lb.ct_entry(f) is None and not lb.in_syn_table(f), "deleted from both"
    assert lb.run(f.packet("A")).moved == ENCAP  # a fresh pick, into the buckets
    lb.ct_put(g, *lb.index_of(A4))  # a write from user space replaces the SYN table's entry
    assert not lb.in_syn_table(g) and lb.ct_entry(g) == lb.index_of(A4)
    assert lb.run(g.packet("A")).moved == HIT
    assert lb.run(g.packet("S")).moved == ENCAP
    t.clear()
    assert len(t) == 0 and t.items() == [] and not lb.in_syn_table(g)
