"""The probes' tc egress program (xdp/probe_encap.c) under BPF_PROG_TEST_RUN,
sharing a real balancer's pinned backends and configuration: a packet whose
mark names a backend leaves in an outer header to that backend, every field
read back from the raw bytes; anything else passes untouched or is dropped,
never sent bare."""
import ipaddress
import os
import struct

import pytest
from pyroute2 import netns
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from l4lb import bpf, consts, netlink
from l4lb.dataplane import Dataplane, RuntimeConfig
from l4lb.testbed import Node
from lbfixture import GW_MAC, ipv4_header_csum, mac, moved

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC = 0, 2, 0xFFFFFFFF
LB_MAC, ROUTER_MAC = "02:00:00:00:01:02", "02:00:00:00:00:fe"  # the frame as the stack addressed it
LB4, LB6 = "198.18.1.2", "fd00:198:18:1::2"
VIP4, VIP6 = "198.18.10.10", "fd00:198:18:10::10"
B4, B6, GONE = "198.18.2.1", "fd00:198:18:2::2", "198.18.2.3"
INDEX = {B4: 1, B6: 2, GONE: 3}
CAP = consts.Capacity(max_vips=4, max_backends=16, ct_size=1024, ring_size=251)


def mark(index: int) -> int:
    return consts.PROBE_MARK_TAG | index


class Probe:
    def __init__(self, prog, dp: Dataplane):
        self.prog = prog
        self.dp = dp
        self.cfg = RuntimeConfig(gateway_mac=GW_MAC)
        self.stats_t = prog.table(consts.MAP_PROBE_STATS)

    def stats(self) -> dict[str, int]:
        return bpf.percpu_sum(self.stats_t)

    def run(self, frame, mark_: int = 0):
        raw = bytes(frame)
        before = self.stats()
        r = self.prog.run(raw, mark=mark_)
        return r.verdict, r.data, moved(before, self.stats())


@pytest.fixture(scope="module")
def probe_program():
    pin_dir = f"{consts.PIN_ROOT}/l4lbprobetest{os.getpid():x}"
    lb = bpf.load_balancer(CAP, pin_dir)
    try:
        dp = Dataplane(lb, CAP)
        dp.clear()
        prog = bpf.load_probe_encap(CAP, pin_dir)
        try:
            yield prog, dp
        finally:
            prog.close()
    finally:
        lb.close()
        bpf.remove_pins(pin_dir)


@pytest.fixture
def probe(probe_program) -> Probe:
    prog, dp = probe_program
    p = Probe(prog, dp)
    dp.write_config(p.cfg, portless_vips=0)
    dp.put_backend(INDEX[B4], B4, 1, True)
    dp.put_backend(INDEX[B6], B6, 1, True)
    dp.put_backend(INDEX[GONE], GONE, 1, False)
    return p


def syn(dst: str, payload: bytes = b"", tos: int = 0, flags: str = "S") -> Ether:
    eth = Ether(src=LB_MAC, dst=ROUTER_MAC)
    if ":" in dst:
        return eth / IPv6(src=LB6, dst=dst, tc=tos) / TCP(sport=41000, dport=80, flags=flags) / payload
    return eth / IP(src=LB4, dst=dst, tos=tos, flags="DF") / TCP(sport=41000, dport=80, flags=flags) / payload


def host_word(outer_src: bytes) -> int:
    """The hash bits of an outer source (its last 32 bits as the CPU reads them)."""
    return int.from_bytes(outer_src[-4:], "little")


def check_outer(probe: Probe, data: bytes, sent: bytes, backend: str) -> bytes:
    """Asserts every field of the encapsulated frame; returns the outer header."""
    inner = sent[14:]
    assert data[0:6] == mac(probe.cfg.gateway_mac), "destination MAC: the balancer's gateway"
    assert data[6:12] == sent[6:12], "source MAC: the interface's own, as the stack wrote it"
    b = ipaddress.ip_address(backend)
    if inner[0] >> 4 == 4:
        inner_tos, inner_df = inner[1], bool(struct.unpack("!H", inner[6:8])[0] & 0x4000)
    else:
        inner_tos, inner_df = (struct.unpack("!I", inner[0:4])[0] >> 20) & 0xFF, True
    if b.version == 4:
        assert data[12:14] == b"\x08\x00", "ethertype IPv4"
        o = data[14:34]
        assert o[0] == 0x45, "version 4, IHL 5"
        assert o[1] == inner_tos, "TOS copied"
        assert struct.unpack("!H", o[2:4])[0] == len(inner) + 20, "total length"
        assert struct.unpack("!H", o[4:6])[0] == 0, "IP id"
        assert struct.unpack("!H", o[6:8])[0] == (0x4000 if inner_df else 0), "DF copied"
        assert o[8] == 64, "TTL"
        assert o[9] == 4, "protocol IPIP"
        assert struct.unpack("!H", o[10:12])[0] == ipv4_header_csum(o), "header checksum"
        assert ipaddress.ip_address(o[12:16]) in probe.cfg.encap_v4, "source from the encap prefix"
        assert ipaddress.ip_address(o[16:20]) == b, "destination: the backend"
        assert data[34:] == inner, "inner packet intact"
    else:
        assert data[12:14] == b"\x86\xdd", "ethertype IPv6"
        o = data[14:54]
        w0 = struct.unpack("!I", o[0:4])[0]
        assert w0 >> 28 == 6
        assert (w0 >> 20) & 0xFF == inner_tos, "traffic class copied"
        assert struct.unpack("!H", o[4:6])[0] == len(inner), "payload length"
        assert o[6] == (4 if inner[0] >> 4 == 4 else 41), "next header: 4in6 or 6in6"
        assert o[7] == 64, "hop limit"
        assert ipaddress.ip_address(o[8:24]) in probe.cfg.encap_v6, "source from the encap prefix"
        assert w0 & 0xFFFFF == host_word(o[8:24]) & 0xFFFFF, "flow label and source: one hash"
        assert ipaddress.ip_address(o[24:40]) == b, "destination: the backend"
        assert data[54:] == inner, "inner packet intact"
    return o


@pytest.mark.parametrize("dst", [VIP4, VIP6], ids=["ipv4", "ipv6"])
def test_an_unmarked_packet_goes_on_untouched_to_the_next_filter(probe, dst):
    sent = bytes(syn(dst))
    verdict, data, counts = probe.run(sent)
    assert (verdict, data, counts) == (TC_ACT_UNSPEC, sent, {"pass": 1})


def test_a_mark_without_the_probe_tag_is_not_a_probe(probe):
    sent = bytes(syn(VIP4))
    for other in (INDEX[B4], 0x10000000 | INDEX[B4], (consts.PROBE_MARK_TAG ^ 0x00100000) | INDEX[B4]):
        verdict, data, counts = probe.run(sent, other)
        assert (verdict, data, counts) == (TC_ACT_UNSPEC, sent, {"pass": 1}), hex(other)


@pytest.mark.parametrize("dst,backend,counter", [(VIP4, B4, "encap4"), (VIP4, B6, "encap6"), (VIP6, B6, "encap6")],
                         ids=["4in4", "4in6", "6in6"])
@pytest.mark.parametrize("kind", ["syn", "request"])
def test_a_marked_probe_leaves_encapsulated_to_the_backend_its_mark_names(probe, dst, backend, counter, kind):
    frame = syn(dst, tos=0x28) if kind == "syn" else \
        syn(dst, b"GET /health HTTP/1.0\r\nHost: svc\r\n\r\n", tos=0x28, flags="PA")
    sent = bytes(frame)
    verdict, data, counts = probe.run(sent, mark(INDEX[backend]))
    assert verdict == TC_ACT_OK
    assert counts == {counter: 1}
    check_outer(probe, data, sent, backend)


def test_probes_of_different_flows_spread_over_the_encap_sources(probe):
    sources = set()
    for sport in range(41000, 41032):
        frame = Ether(src=LB_MAC, dst=ROUTER_MAC) / IP(src=LB4, dst=VIP4) / TCP(sport=sport, dport=80, flags="S")
        verdict, data, _ = probe.run(frame, mark(INDEX[B4]))
        assert verdict == TC_ACT_OK
        sources.add(data[26:30])
    assert len(sources) > 16, "the outer source varies with the flow, as client traffic's does"


def test_ipv6_to_an_ipv4_backend_is_dropped_not_sent_bare(probe):
    verdict, _, counts = probe.run(syn(VIP6), mark(INDEX[B4]))
    assert (verdict, counts) == (TC_ACT_SHOT, {"error": 1})


@pytest.mark.parametrize("index", [0, INDEX[GONE], 9, CAP.max_backends + 1, consts.PROBE_INDEX_MASK],
                         ids=["zero", "invalid", "empty", "past-the-end", "largest"])
def test_a_mark_naming_no_valid_backend_is_dropped(probe, index):
    verdict, _, counts = probe.run(syn(VIP4), mark(index))
    assert (verdict, counts) == (TC_ACT_SHOT, {"no_backend": 1})


def test_without_a_configuration_marked_probes_are_dropped(probe):
    t = probe.dp.t[consts.MAP_CONFIG]
    t[t.Key(0)] = t.Leaf()  # configured = 0, as before `l4lb run` wrote it
    verdict, _, counts = probe.run(syn(VIP4), mark(INDEX[B4]))
    assert (verdict, counts) == (TC_ACT_SHOT, {"error": 1})
    verdict, _, counts = probe.run(syn(VIP4))
    assert (verdict, counts) == (TC_ACT_UNSPEC, {"pass": 1})


def test_the_program_follows_the_balancers_maps_through_their_pins(probe):
    """A backend the balancer's map gets after the probe program was loaded is used at once."""
    probe.dp.put_backend(5, "198.18.2.5", 1, True)
    verdict, data, _ = probe.run(syn(VIP4), mark(5))
    assert verdict == TC_ACT_OK
    assert ipaddress.ip_address(data[30:34]) == ipaddress.ip_address("198.18.2.5")


def test_loading_without_the_balancers_pins_is_refused(tmp_path):
    with pytest.raises(bpf.BpfError, match="start `l4lb run`"):
        bpf.load_probe_encap(CAP, str(tmp_path))


def test_the_probe_program_declares_exactly_the_registered_maps(probe_program):
    from test_registry import check

    prog, _ = probe_program
    check(prog, CAP)


@pytest.fixture
def scratch():
    """A namespace of this test's own with an interface p0 (a veth: no dummy devices here)."""
    ns = f"l4lbtb-{os.getpid():x}0-probe"
    netns.create(ns)
    try:
        with Node("scratch", ns) as node:
            node.ipr.link("add", ifname="p0", kind="veth", peer="p1")
            node.ipr.link("set", index=node.index("p0"), state="up")
            yield node
    finally:
        netns.remove(ns)


def test_attach_adds_clsact_and_the_filter_and_detach_leaves_no_trace(probe_program, scratch):
    prog, _ = probe_program
    assert not scratch.run(netlink.has_clsact, "p0")
    scratch.run(prog.attach_egress, "p0")
    try:
        assert scratch.run(netlink.tc_egress_filters, "p0") == [(consts.PROBE_TC_PRIO, consts.PROG_PROBE)]
        with pytest.raises(bpf.BpfError, match="attached already"):
            scratch.run(netlink.tc_attach_egress, "p0", prog.fd, prog.name)
    finally:
        scratch.run(prog.detach)
    assert not scratch.run(netlink.has_clsact, "p0"), "the clsact qdisc we added is gone"
    scratch.run(prog.detach)  # twice: nothing to do


def test_detach_keeps_a_clsact_qdisc_that_was_there_before(probe_program, scratch):
    prog, _ = probe_program
    scratch.ipr.tc("add", "clsact", scratch.index("p0"))
    scratch.run(prog.attach_egress, "p0")
    assert scratch.run(netlink.tc_egress_filters, "p0")
    scratch.run(prog.detach)
    assert scratch.run(netlink.has_clsact, "p0")
    assert scratch.run(netlink.tc_egress_filters, "p0") == []


@pytest.mark.parametrize("dst,backend,counter", [(VIP4, B4, "encap4"), (VIP4, B6, "encap6"), (VIP6, B6, "encap6")],
                         ids=["4in4", "4in6", "6in6"])
def test_a_probe_marked_gue_leaves_in_gue_to_the_gue_port(probe, dst, backend, counter):
    """A probe for a VIP with encap: gue travels as that VIP's packets do."""
    probe.cfg.gue_port = 5555
    probe.dp.write_config(probe.cfg)
    sent = bytes(syn(dst, b"GET / HTTP/1.0\r\n\r\n", tos=0x28, flags="PA"))
    verdict, data, counts = probe.run(sent, mark(INDEX[backend]) | consts.PROBE_MARK_GUE)
    assert verdict == TC_ACT_OK
    assert counts == {counter: 1, "gue": 1}
    inner = sent[14:]
    hdr = 20 if ":" not in backend else 40
    o, u = data[14:14 + hdr], data[14 + hdr:14 + hdr + 8]
    assert data[0:6] == mac(probe.cfg.gateway_mac) and data[6:12] == sent[6:12]
    if hdr == 20:
        assert data[12:14] == b"\x08\x00" and o[0] == 0x45 and o[1] == 0x28
        assert struct.unpack("!H", o[2:4])[0] == len(inner) + 28, "total length: IP, UDP, inner"
        assert (o[8], o[9]) == (64, 17), "TTL, protocol UDP"
        assert struct.unpack("!H", o[10:12])[0] == ipv4_header_csum(o), "header checksum"
        assert ipaddress.ip_address(o[12:16]) in probe.cfg.encap_v4
        assert ipaddress.ip_address(o[16:20]) == ipaddress.ip_address(backend)
        hashed = host_word(o[12:16])
    else:
        assert data[12:14] == b"\x86\xdd"
        assert struct.unpack("!H", o[4:6])[0] == len(inner) + 8 and (o[6], o[7]) == (17, 64)
        assert ipaddress.ip_address(o[8:24]) in probe.cfg.encap_v6
        assert ipaddress.ip_address(o[24:40]) == ipaddress.ip_address(backend)
        hashed = host_word(o[8:24])
    sport, dport, length, check = struct.unpack("!HHHH", u)
    assert (dport, length, check) == (5555, len(inner) + 8, 0)
    assert 49152 <= sport
    if hdr == 40:  # a /64 source holds the whole hash word: the source port is its low 14 bits
        assert sport == 49152 + (hashed & 0x3FFF), "source port: the flow hash"
    assert data[14 + hdr + 8:] == inner, "inner packet intact"


def test_the_gue_bit_of_a_mark_is_not_part_of_the_backend_index(probe):
    sent = bytes(syn(VIP4))
    verdict, data, counts = probe.run(sent, mark(INDEX[B4]))
    assert counts == {"encap4": 1} and data[23] == 4  # IP-in-IP without the bit
    verdict, data, counts = probe.run(sent, mark(INDEX[B4]) | consts.PROBE_MARK_GUE)
    assert counts == {"encap4": 1, "gue": 1} and data[23] == 17
    assert ipaddress.ip_address(data[30:34]) == ipaddress.ip_address(B4)
