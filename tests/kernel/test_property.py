"""Property test: random, truncated and corrupted frames through the real
program, each verdict, output frame and counter change compared with the
reference model of docs/dataplane.md (refmodel.py).

The frames come from one fixed-seed random.Random, so a run is reproducible:
a failure names the seed and the case number (L4LB_PROPERTY_SEED and
L4LB_PROPERTY_CASES change them). Cases run in order on one connection table:
the model keeps its own copy of the table (the buckets and the SYN tables),
and flows come back (ACKs, RSTs, SYNs again, UDP again, ICMP errors about
them), before and after backends change, so hits, stale entries and re-picks
are all exercised. Some flows' packets are queued to reach the SYN table's
paths for sure: a SYN and the packet that promotes its entry, a SYN again
over the flow's entry in the buckets, two flows made to share a SYN slot,
and SYNs whose next packets come after a backend leaves or drains. After
every packet to a VIP the kernel's entry for its flow and the flow's SYN slot
are compared with the model's; the whole of both tables at each change and
at the end.

ICMP whose headers would run past the IP length into Ethernet padding
(icmp_reads_padding) must be judged by the IP length alone; the run must
meet such frames, and the tests at the end pin the cases down.

The run is made twice: with next_hop gateway, and with next_hop fib in a
namespace (l4lb.testbed.FibNet, FibRun below) whose routes send the backends
different ways: back out of the ingress interface, out of the other one
(redirect), to a next hop without a neighbour entry, nowhere. The same
frames come in on lb0 and some on lb1; halfway the routes and a neighbour
change and, a few dozen frames later, fib_gen is bumped (as `l4lb run` does
on rtnetlink events), so the answers kept per backend are first used past
the change and then asked again; later routes change with no bump at all
and the run waits until every answer kept has expired, so that answers find
it out at their next clock read. The model's FIB is read from the
namespace's routes, neighbours and links (NamespaceFib), never from the
program.
"""
from __future__ import annotations

import contextlib
import heapq
import ipaddress
import itertools
import json
import os
import random
import re
import struct
import subprocess
import time
from collections import Counter
from dataclasses import dataclass

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP, IPOption_EOL
from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest,
                                ICMPv6PacketTooBig, ICMPv6TimeExceeded, IPv6)
from scapy.layers.l2 import ARP, Ether

import refmodel
from lbfixture import CLIENT_MAC, LB_MAC
from refmodel import COUNTERS, CtEntry, Flow, LbModel

from l4lb import consts, libbpf
from l4lb.model import VipKey
from l4lb.testbed import FibNet
from l4lb.testbed.fibnet import LB0_MAC, LB1_MAC

SEED = int(os.environ.get("L4LB_PROPERTY_SEED", "1318"))
CASES = int(os.environ.get("L4LB_PROPERTY_CASES", "3000"))

V4_TCP = ("198.18.10.10", 80, "tcp")          # 4in4, three backends
V4_UDP_ANY = ("198.18.10.11", 0, "udp")       # port-less, client affinity, 4in4 and 4in6
V4_UDP_53 = ("198.18.10.11", 53, "udp")       # same address: the exact port wins over port 0
V6_TCP = ("fd00:198:18:10::10", 443, "tcp")   # 6in6
V6_UDP_NOCT = ("fd00:198:18:10::10", 53, "udp")  # same address, no connection table
V4_EMPTY = ("198.18.10.12", 8080, "tcp")      # no backend at all
V4_GUE = ("198.18.10.13", 80, "tcp")          # GUE: 4in4 and 4in6
V6_GUE = ("fd00:198:18:10::10", 8443, "tcp")  # GUE 6in6, on V6_TCP's address

VIPS = [
    (V4_TCP, {"198.18.2.1": 1, "198.18.2.2": 1, "198.18.2.3": 2}, ()),
    (V4_UDP_ANY, {"198.18.2.4": 1, "fd00:198:18:2::4": 1}, ("client_affinity",)),
    (V4_UDP_53, {"198.18.2.6": 1}, ()),
    (V6_TCP, {"fd00:198:18:2::1": 1, "fd00:198:18:2::2": 1}, ()),
    (V6_UDP_NOCT, {"fd00:198:18:2::3": 1}, ("no_conntrack",)),
    (V4_EMPTY, {}, ()),
    (V4_GUE, {"198.18.2.1": 1, "fd00:198:18:2::7": 1}, (), "gue"),
    (V6_GUE, {"fd00:198:18:2::1": 1, "fd00:198:18:2::3": 1}, (), "gue"),
]
# Changes in the middle of the run, at 1/3 and 2/3 of the cases (see
# reconfigure): 198.18.2.3 leaves and 198.18.2.5 takes its backend index with
# a new generation, so the entries of 2.3 go stale; the 4in6 backend leaves;
# fd00:198:18:2::2 drains (weight 0: its entries still hit); the MTU drops to
# 1300, below the IPv6 minimum once 40 bytes of encapsulation are taken off;
# V4_TCP turns to GUE (its established flows with it) and gue_port changes.
BACKEND_INDICES = 10  # exactly what VIPS needs, so that a freed index is reused
MTU, LATER_MTU = 1500, 1300
NON_VIP4 = ["198.18.1.1", "198.18.10.99", "198.18.2.1"]
NON_VIP6 = ["fd00:198:18:1::1", "fd00:198:18:10::99"]
EXT_HEADERS = [0, 43, 44, 50, 51, 60, 135, 139, 140]
TCP_FLAGS = ["S", "S", "SA", "A", "PA", "FA", "R", "RA", "SR", "F", "", "SEC", "U"]
TCP_VIPS = [V4_TCP, V6_TCP, V4_GUE, V6_GUE]  # the TCP VIPs with backends
# Flows whose packets straddle a change (see reconfigure): new flows to the VIP,
# their packets before the change and after it. At stage 1 SYNs wait in the SYN
# table while 198.18.2.3 leaves and its index goes to 198.18.2.5: their next
# packets find the entries of 2.3 stale. At stage 2 established flows of V6_TCP
# SYN again while fd00:198:18:2::2 drains: the fresh picks, never the drained
# backend, wait in the SYN table, and the next packets take them over the
# buckets' older entries (on ::2 for about half of them).
ACROSS = {1: (V4_TCP, ["S"], ["A"]), 2: (V6_TCP, ["S", "A"], ["S", "PA"])}
ACROSS_FLOWS = 12

# --- frames --------------------------------------------------------------------------------


@dataclass
class Case:
    desc: str
    frame: bytes


def l2(etype: int, vlan: tuple | None, dst: str = LB_MAC, src: str = CLIENT_MAC) -> bytes:
    mac = lambda m: bytes(int(x, 16) for x in m.split(":"))  # noqa: E731
    if vlan is None:
        return mac(dst) + mac(src) + etype.to_bytes(2, "big")
    tpid, tci = vlan
    return mac(dst) + mac(src) + struct.pack("!HHH", tpid, tci, etype)


class Generator:
    """Random frames: valid traffic to VIPs and elsewhere, then mutations."""

    def __init__(self, rnd: random.Random):
        self.r = rnd
        self.mtu = MTU
        self.flows: list[tuple] = []  # (family, client, vip, cport, vport, proto) already sent
        self.n = 0  # cases made
        self.queue: list[tuple] = []  # heap of (due case, order, desc, flow, TCP flags): a flow's next packets
        self.order = itertools.count()
        self.kinds = [
            (14, self.tcp_vip4), (10, self.tcp_vip6), (8, self.udp_any4), (4, self.udp_noct6),
            (2, self.tcp_empty), (18, self.again), (7, self.not_vip), (5, self.echo),
            (3, self.other_icmp), (9, self.icmp_error), (4, self.fragment), (4, self.ext_header),
            (3, self.other_proto), (3, self.not_ip), (6, self.big), (3, self.garbage),
            (8, self.tcp_gue), (1, self.syn_clash), (2, self.resyn),
        ]
        self.total = sum(w for w, _ in self.kinds)

    # helpers
    def client4(self) -> str:
        return f"198.18.0.{self.r.randint(1, 254)}"

    def client6(self) -> str:
        return f"fd00:198:18::{self.r.randint(1, 0xffff):x}"

    def vlan(self):
        x = self.r.random()
        if x < 0.2:
            return (0x8100, self.r.randint(0, 0xffff))
        if x < 0.25:
            return (0x88A8, self.r.randint(0, 0xffff))
        return None

    def ip4(self, src, dst, **kw) -> IP:
        if self.r.random() < 0.1:
            kw["options"] = [IPOption_NOP()] * self.r.choice([3, 7, 39]) + [IPOption_EOL()]
        kw.setdefault("tos", self.r.choice([0, 0, 0x10, 0xb8, self.r.randint(0, 255)]))
        kw.setdefault("flags", self.r.choice(["", "DF", "DF"]))
        kw.setdefault("ttl", self.r.randint(1, 255))
        return IP(src=src, dst=dst, id=self.r.randint(0, 0xffff), **kw)

    def ip6(self, src, dst, **kw) -> IPv6:
        kw.setdefault("tc", self.r.choice([0, 0, 0xb8, self.r.randint(0, 255)]))
        kw.setdefault("fl", self.r.randint(0, 0xfffff))
        kw.setdefault("hlim", self.r.randint(1, 255))
        return IPv6(src=src, dst=dst, **kw)

    def payload(self, hi: int = 64) -> bytes:
        return self.r.randbytes(self.r.choice([0, 0, 1, 7, self.r.randint(0, hi)]))

    def frame(self, l3pkt) -> bytes:
        raw = bytes(l3pkt)
        out = l2(0x0800 if raw[0] >> 4 == 4 else 0x86DD, self.vlan()) + raw
        if self.r.random() < 0.1:  # Ethernet padding after the IP packet
            out += self.r.randbytes(self.r.randint(1, 30))
        return out

    def l4(self, proto, sport, dport, flags=None):
        if proto == "tcp":
            return TCP(sport=sport, dport=dport, flags=flags if flags is not None else self.r.choice(TCP_FLAGS),
                       seq=self.r.getrandbits(32), ack=self.r.getrandbits(32), window=self.r.randint(0, 0xffff))
        return UDP(sport=sport, dport=dport)

    def flow_frame(self, fam, client, vip, cport, vport, proto, flags=None, size=None):
        ip = self.ip4(client, vip) if fam == 4 else self.ip6(client, vip)
        pkt = ip / self.l4(proto, cport, vport, flags)
        if size is None:
            return self.frame(pkt / self.payload())
        hdr = len(bytes(pkt))
        return self.frame(pkt / self.r.randbytes(max(0, size - hdr)))

    def remember(self, *flow):
        self.flows.append(flow)
        return flow

    def later(self, after: int, desc: str, flow: tuple, flags: str) -> None:
        """Queues a packet of the flow, due `after` cases from now; due packets
        come before random ones, unmutated."""
        heapq.heappush(self.queue, (self.n + after, next(self.order), f"{desc} {flow[5]}{flow[0]} {flags}",
                                    flow, flags))

    def tcp_flow(self, vip: tuple | None = None) -> tuple:
        """A new TCP flow to the VIP (else to a random one of TCP_VIPS), not
        remembered: the flows that queue packets leave again() and icmp_error()
        to the others."""
        addr, port, _ = vip or self.r.choice(TCP_VIPS)
        fam = ipaddress.ip_address(addr).version
        return fam, self.client4() if fam == 4 else self.client6(), addr, self.r.randint(1024, 65535), port, "tcp"

    def same_syn_slot(self, f: tuple) -> tuple:
        """A new flow to f's VIP with f's SYN-table slot: another client, the
        source port searched for."""
        fam, _, vip, _, vport, _ = f
        slot, dst = model_flow(f).syn_slot(), ipaddress.ip_address(vip).packed
        while True:
            client = self.client4() if fam == 4 else self.client6()
            src, start = ipaddress.ip_address(client).packed, self.r.randint(1, 65535)
            for j in range(65535):
                cport = (start + j) % 65535 + 1
                if Flow(fam, src, dst, cport, vport, refmodel.TCP).syn_slot() == slot and client != f[1]:
                    return fam, client, vip, cport, vport, "tcp"

    def straddle(self, stage: int, vip: tuple, n: int, flags: list[str]) -> list[tuple]:
        """n new flows to the VIP, each sending packets with these flags in
        turn before change `stage`; the flows, for resume()."""
        flows = [self.tcp_flow(vip) for _ in range(n)]
        for step, fl in enumerate(flags):
            for j, f in enumerate(flows):
                self.later(step * n + j, f"before change {stage}:", f, fl)
        return flows

    def resume(self, stage: int, flows: list[tuple], flags: list[str]) -> None:
        """The straddling flows' packets after change `stage`."""
        assert not any(item[2].startswith(f"before change {stage}:") for item in self.queue), \
            f"packets meant for before change {stage} are still queued"
        for step, fl in enumerate(flags):
            for j, f in enumerate(flows):
                self.later(step * len(flows) + j, f"after change {stage}:", f, fl)

    # kinds of traffic
    def tcp_vip4(self):
        f = self.remember(4, self.client4(), V4_TCP[0], self.r.randint(1024, 65535), 80, "tcp")
        return "tcp4 to VIP", self.flow_frame(*f)

    def tcp_vip6(self):
        f = self.remember(6, self.client6(), V6_TCP[0], self.r.randint(1, 65535), 443, "tcp")
        return "tcp6 to VIP", self.flow_frame(*f)

    def udp_any4(self):
        f = self.remember(4, self.client4(), V4_UDP_ANY[0], self.r.randint(1, 65535),
                          self.r.choice([443, 53, self.r.randint(0, 65535)]), "udp")
        return "udp4 to port-less VIP", self.flow_frame(*f)

    def udp_noct6(self):
        f = self.remember(6, self.client6(), V6_UDP_NOCT[0], self.r.randint(1, 65535), 53, "udp")
        return "udp6 to no_conntrack VIP", self.flow_frame(*f)

    def tcp_gue(self):
        if self.r.random() < 0.5:
            f = self.remember(4, self.client4(), V4_GUE[0], self.r.randint(1024, 65535), 80, "tcp")
        else:
            f = self.remember(6, self.client6(), V6_GUE[0], self.r.randint(1, 65535), 8443, "tcp")
        return f"tcp{f[0]} to GUE VIP", self.flow_frame(*f)

    def tcp_empty(self):
        f = self.remember(4, self.client4(), V4_EMPTY[0], self.r.randint(1024, 65535), 8080, "tcp")
        return "tcp4 to VIP without backends", self.flow_frame(*f)

    def again(self):
        if not self.flows:
            return self.tcp_vip4()
        f = self.r.choice(self.flows)
        flags = self.r.choice(["A", "A", "PA", "FA", "R", "RA", "S", "SA", ""])
        return f"again {f[5]}{f[0]} {flags}", self.flow_frame(*f, flags=flags)

    # flows whose packets are queued: SYN-table paths
    def syn_clash(self):
        """Two new flows with the same SYN-table slot: the second one's SYN
        writes over the first one's entry (ct_syn_evict), so the first one's
        ACK takes a fresh pick into the buckets, while the second one's entry
        is promoted."""
        f1 = self.tcp_flow()
        f2 = self.same_syn_slot(f1)
        for after, (f, flags) in enumerate([(f1, "S"), (f2, "S"), (f1, "A"), (f2, "A")]):
            self.later(after, "same SYN slot:", f, flags)

    def resyn(self):
        """An earlier TCP flow: a packet that leaves it in the buckets, a SYN
        (a reused 5-tuple: a fresh pick into the SYN table), then the packet
        that takes the SYN table's newer entry."""
        vips = {(a, p) for a, p, _ in TCP_VIPS}
        earlier = [f for f in self.flows if f[5] == "tcp" and (f[2], f[4]) in vips]
        f = self.r.choice(earlier) if earlier else self.tcp_flow()
        for after, flags in enumerate(["A", "S", "A"]):
            self.later(after, "SYN again:", f, flags)

    def not_vip(self):
        x = self.r.randrange(5)
        if x == 0:
            return "tcp4 to a VIP address, other port", self.flow_frame(
                4, self.client4(), V4_TCP[0], self.r.randint(1, 65535), self.r.choice([81, 443, 8080]), "tcp")
        if x == 1:
            return "tcp4 to the port-less UDP VIP's address", self.flow_frame(
                4, self.client4(), V4_UDP_ANY[0], self.r.randint(1, 65535), self.r.randint(0, 65535), "tcp")
        if x == 2:
            return "udp6 to a VIP address, no UDP VIP on that port", self.flow_frame(
                6, self.client6(), V6_TCP[0], self.r.randint(1, 65535), 443, "udp")
        if x == 3:
            return "tcp/udp4 to no VIP", self.flow_frame(
                4, self.client4(), self.r.choice(NON_VIP4), self.r.randint(1, 65535), 80, self.r.choice(["tcp", "udp"]))
        return "tcp/udp6 to no VIP", self.flow_frame(
            6, self.client6(), self.r.choice(NON_VIP6), self.r.randint(1, 65535), 443, self.r.choice(["tcp", "udp"]))

    def echo(self):
        if self.r.random() < 0.5:
            dst = self.r.choice([V4_TCP[0], V4_UDP_ANY[0], V4_EMPTY[0], self.r.choice(NON_VIP4)])
            pkt = self.ip4(self.client4(), dst) / ICMP(type=8, id=self.r.randint(0, 0xffff), seq=self.r.randint(0, 99))
            return f"echo4 to {dst}", self.frame(pkt / self.payload())
        dst = self.r.choice([V6_TCP[0], V6_TCP[0], self.r.choice(NON_VIP6)])
        pkt = self.ip6(self.client6(), dst) / ICMPv6EchoRequest(id=self.r.randint(0, 0xffff))
        return f"echo6 to {dst}", self.frame(pkt / self.payload())

    def other_icmp(self):
        if self.r.random() < 0.5:
            dst = self.r.choice([V4_TCP[0], self.r.choice(NON_VIP4)])
            t = self.r.choice([0, 5, 11, 12, 13, 42])
            pkt = self.ip4(self.client4(), dst) / ICMP(type=t, code=self.r.randint(0, 3)) / self.payload()
            return f"icmp4 type {t}", self.frame(pkt)
        dst = self.r.choice([V6_TCP[0], self.r.choice(NON_VIP6)])
        pkt = self.r.choice([ICMPv6EchoReply(), ICMPv6TimeExceeded() / self.payload(48)])
        if self.r.random() < 0.3:
            pkt = bytes([self.r.choice([3, 4, 133, 135, 136, 200])]) + self.r.randbytes(self.r.randint(7, 40))
            return "icmp6 other type", self.frame(self.ip6(self.client6(), dst, nh=58) / pkt)
        return f"icmp6 {pkt.name}", self.frame(self.ip6(self.client6(), dst) / pkt)

    def icmp_error(self):
        """An ICMP error about a packet a backend sent from a VIP to a client."""
        if self.flows and self.r.random() < 0.6:
            fam, client, vip, cport, vport, proto = self.r.choice(self.flows)
        elif self.r.random() < 0.5:
            fam, client, vip, cport, vport, proto = 4, self.client4(), self.r.choice(
                [V4_TCP[0], V4_UDP_ANY[0], V4_EMPTY[0]]), self.r.randint(1, 65535), 80, self.r.choice(["tcp", "udp"])
        else:
            fam, client, vip, cport, vport, proto = 6, self.client6(), V6_TCP[0], self.r.randint(1, 65535), \
                self.r.choice([443, 53]), self.r.choice(["tcp", "udp"])
        desc = f"icmp error about {proto}{fam} {vip}:{vport}"
        qsrc, dst = vip, vip
        x = self.r.random()
        if x < 0.1:  # the quote is about another address
            qsrc = self.client4() if fam == 4 else self.client6()
            desc += ", quote from elsewhere"
        elif x < 0.15:  # sent to an address that carries no VIP
            dst = qsrc = self.r.choice(NON_VIP4 if fam == 4 else NON_VIP6)
            desc += ", to no VIP"
        quoted_l4 = self.l4(proto, vport, cport, "SA" if proto == "tcp" else None)
        if self.r.random() < 0.08:
            quoted_l4 = ICMP() if fam == 4 else ICMPv6EchoReply()
            desc += ", quoting ICMP"
        router = self.r.choice(["198.18.1.254", client]) if fam == 4 else self.r.choice(["fd00:198:18:1::fe", client])
        if fam == 4:
            quote = bytes(self.ip4(qsrc, client) / quoted_l4 / self.payload(400))
            keep = self.r.choice([len(quote), 28, 28, self.r.randint(0, len(quote))])
            icmp = ICMP(type=3, code=self.r.randint(0, 15), nexthopmtu=self.r.choice([0, 1400]))
            pkt = self.ip4(router, dst) / icmp / quote[:keep]
        else:
            quote = bytes(self.ip6(qsrc, client) / quoted_l4 / self.payload(400))
            keep = self.r.choice([len(quote), 48, 48, self.r.randint(0, len(quote))])
            icmp = self.r.choice([ICMPv6PacketTooBig(mtu=1280), ICMPv6DestUnreach(code=self.r.randint(0, 6))])
            pkt = self.ip6(router, dst) / icmp / quote[:keep]
        return desc + f", quote {keep} bytes", self.frame(pkt)

    def fragment(self):
        dst = self.r.choice([V4_TCP[0], V4_UDP_ANY[0], V4_EMPTY[0], self.r.choice(NON_VIP4)])
        flags, frag = self.r.choice([("MF", 0), ("MF", self.r.randint(1, 8191)), ("", self.r.randint(1, 8191)),
                                     ("MF+DF", 0)])
        proto = self.r.choice(["tcp", "udp", "icmp"])
        l4 = ICMP(type=8) if proto == "icmp" else self.l4(proto, self.r.randint(1, 65535), 80, "S")
        pkt = self.ip4(self.client4(), dst, flags=flags, frag=frag) / l4 / self.payload()
        return f"fragment {flags} offset {frag} {proto} to {dst}", self.frame(pkt)

    def ext_header(self):
        dst = self.r.choice([V6_TCP[0], V6_TCP[0], self.r.choice(NON_VIP6)])
        nh = self.r.choice(EXT_HEADERS)
        ext = bytes([6, 0]) + bytes(6)  # 8 bytes, then TCP
        pkt = self.ip6(self.client6(), dst, nh=nh) / (ext + bytes(self.l4("tcp", self.r.randint(1, 65535), 443, "S")))
        return f"ipv6 extension header {nh} to {dst}", self.frame(pkt)

    def other_proto(self):
        body = self.r.randbytes(self.r.randint(0, 60))
        if self.r.random() < 0.5:
            dst = self.r.choice([V4_TCP[0], self.r.choice(NON_VIP4)])
            proto = self.r.choice([0, 4, 41, 47, 50, 58, 132, 255])
            return f"ipv4 protocol {proto} to {dst}", self.frame(self.ip4(self.client4(), dst, proto=proto) / body)
        dst = self.r.choice([V6_TCP[0], self.r.choice(NON_VIP6)])
        nh = self.r.choice([1, 4, 41, 47, 59, 132, 253])
        return f"ipv6 next header {nh} to {dst}", self.frame(self.ip6(self.client6(), dst, nh=nh) / body)

    def not_ip(self):
        x = self.r.randrange(4)
        if x == 0:
            arp = ARP(op=1, psrc=self.client4(), pdst=V4_TCP[0], hwsrc=CLIENT_MAC)
            return "ARP", l2(0x0806, self.vlan()) + bytes(arp)
        if x == 1:  # two tags: the inner one is not IP
            return "QinQ", l2(0x8100, (0x88A8, 5)) + bytes.fromhex("0007 0800") + bytes(
                self.ip4(self.client4(), V4_TCP[0]) / TCP(dport=80, flags="S"))
        et = self.r.choice([0x88CC, 0x8847, 0x0801, 0x86DC, self.r.randint(0, 0xffff)])
        return f"ethertype {et:#06x}", l2(et, self.vlan()) + self.r.randbytes(self.r.randint(0, 60))

    def big(self):
        """Around the MTU: outer overhead 20 (4in4) or 40 (4in6, 6in6), 8 more for GUE."""
        size = self.r.randint(self.mtu - 70, self.mtu + 10)
        x = self.r.randrange(5)
        if x == 0:
            f = self.remember(4, self.client4(), V4_TCP[0], self.r.randint(1024, 65535), 80, "tcp")
        elif x == 1:
            f = self.remember(4, self.client4(), V4_UDP_ANY[0], self.r.randint(1, 65535), 443, "udp")
        elif x == 2:
            f = self.remember(6, self.client6(), V6_TCP[0], self.r.randint(1, 65535), 443, "tcp")
        elif x == 3:
            f = self.remember(4, self.client4(), V4_GUE[0], self.r.randint(1024, 65535), 80, "tcp")
        else:
            f = self.remember(6, self.client6(), V6_GUE[0], self.r.randint(1, 65535), 8443, "tcp")
        return f"big {f[5]}{f[0]} ip_len {size}", self.flow_frame(*f, size=size)

    def garbage(self):
        if self.r.random() < 0.5:
            return "garbage", self.r.randbytes(self.r.randint(14, 90))
        et = self.r.choice([0x0800, 0x86DD, 0x8100])
        return f"garbage after ethertype {et:#06x}", l2(et, None) + self.r.randbytes(self.r.randint(0, 80))

    # mutations
    def mutate(self, frame: bytes) -> tuple[str, bytes]:
        f = bytearray(frame)
        l3 = 18 if len(f) >= 14 and f[12:14] in (b"\x81\x00", b"\x88\xa8") else 14
        ip4 = len(f) > l3 and f[l3] >> 4 == 4
        l4 = l3 + ((f[l3] & 15) * 4 if ip4 else 40) if len(f) > l3 else l3
        x = self.r.random()
        if x < 0.35:
            cut = self.r.choice([14, 15, 17, 18, l3 + self.r.randint(0, 19), l3 + 19,
                                 l3 + 20, l3 + 39, l3 + 40, l4 - 1, l4, l4 + 3, l4 + 7, l4 + 8, l4 + 19,
                                 l4 + 20, l4 + 27, l4 + 28, l4 + 47, l4 + 48, len(f) - 1])
            cut = max(14, min(cut, len(f)))  # BPF_PROG_TEST_RUN refuses frames under 14 bytes
            if self.r.random() < 0.5 and cut > l3 + 4:  # cut, and the IP length made to agree
                if ip4:
                    f[l3 + 2:l3 + 4] = (cut - l3).to_bytes(2, "big")
                elif cut >= l3 + 40:
                    f[l3 + 4:l3 + 6] = (cut - l3 - 40).to_bytes(2, "big")
                return f"cut at {cut}, length fixed", bytes(f[:cut])
            return f"cut at {cut}", bytes(f[:cut])
        if len(f) <= l3 + 8:
            return "", frame
        if x < 0.6:
            off = self.r.choice([12, 13, l3, l3, l3 + 1, l3 + 2, l3 + 3, l3 + 4, l3 + 5, l3 + 6, l3 + 9,
                                 l3 + 19, l3 + 39, l4, l4 + 1, l4 + 2, l4 + 3, l4 + 8, l4 + 9, l4 + 13,
                                 l4 + 17, l4 + 20, l4 + 28, self.r.randrange(len(f))])
            if off >= len(f):
                off = self.r.randrange(len(f))
            v = self.r.randint(1, 255)
            f[off] ^= v
            return f"byte {off} ^= {v:#04x}", bytes(f)
        if x < 0.7:
            v = self.r.randint(0, 15)
            f[l3] = (f[l3] & 0xF0) | v
            return f"IHL/low nibble {v}", bytes(f)
        if x < 0.8:
            v = self.r.choice([0, 4, 6, 5, 15])
            f[l3] = (v << 4) | (f[l3] & 15)
            return f"version {v}", bytes(f)
        lo = 2 if ip4 else 4
        iplen = max(0, len(f) - l3 - (0 if ip4 else 40))
        v = self.r.choice([iplen + 1, iplen + self.r.randint(2, 100), self.r.randint(0, 0xffff),
                           max(0, iplen - self.r.randint(1, 30)), self.r.randint(0, 24)]) & 0xFFFF
        f[l3 + lo:l3 + lo + 2] = v.to_bytes(2, "big")
        return f"{'tot_len' if ip4 else 'payload_len'} {v} (frame has {iplen})", bytes(f)

    def case(self) -> Case:
        self.n += 1
        if not self.queue or self.queue[0][0] > self.n:
            pick = self.r.randrange(self.total)
            for w, fn in self.kinds:
                if pick < w:
                    break
                pick -= w
            made = fn()
            if made is not None:  # else it queued the packets of flows
                desc, frame = made
                if self.r.random() < 0.3:
                    what, frame = self.mutate(frame)
                    if what:
                        desc += f" [{what}]"
                return Case(desc, frame)
        _, _, desc, flow, flags = heapq.heappop(self.queue)
        return Case(desc, self.flow_frame(*flow, flags=flags))


def model_flow(f: tuple) -> Flow:
    """A generator's flow (family, client, vip, cport, vport, proto) as the model's."""
    fam, client, vip, cport, vport, proto = f
    return Flow(fam, ipaddress.ip_address(client).packed, ipaddress.ip_address(vip).packed, cport, vport,
                refmodel.TCP if proto == "tcp" else refmodel.UDP)


# --- next_hop fib: the namespace's FIB, read with `ip -j` -------------------------------------

# The backends of VIPS through FibNet: its /26 and /66 routes send 198.18.2.0/26 and
# fd00:198:18:2::/66 via R1 on lb0 (2.1, 2.5, ::1, ::7 stay there); these host routes send the
# others elsewhere. Before the run:
FIB_ROUTES = [
    ("198.18.2.2", "via", "198.18.1.3", "dev", "lb0"),              # R1b: no neighbour entry
    ("198.18.2.3", "via", "198.18.1.10", "dev", "lb1"),             # R2: out of lb1
    ("198.18.2.4", "unreachable"),
    ("198.18.2.6", "via", "198.18.1.10", "dev", "lb1"),
    ("fd00:198:18:2::2", "via", "fd00:198:18:1:2::2", "dev", "lb1"),
    ("fd00:198:18:2::3", "via", "fd00:198:18:1:1::3", "dev", "lb0"),  # R1b
    ("fd00:198:18:2::4", "unreachable"),
]
# Halfway (FIB_CHANGE_AT): 2.1 moves to R2, 2.2 gets R1 (a neighbour), 2.6 goes out of lb1p
# (an interface the program is not on), fd00:198:18:2::2 becomes unreachable and R1's IPv6
# neighbour entry changes its MAC; fib_gen is bumped FIB_BUMP_AFTER frames later.
FIB_CHANGES = [
    ("route", "replace", "198.18.2.1", "via", "198.18.1.10", "dev", "lb1"),
    ("route", "replace", "198.18.2.2", "via", "198.18.1.2", "dev", "lb0"),
    ("neigh", "replace", "198.18.2.6", "lladdr", "02:00:00:00:0f:0b", "dev", "lb1p", "nud", "permanent"),
    ("route", "replace", "198.18.2.6", "dev", "lb1p"),
    ("route", "replace", "unreachable", "fd00:198:18:2::2"),
    ("neigh", "replace", "fd00:198:18:1:1::2", "lladdr", "02:00:00:00:0f:09", "dev", "lb0", "nud", "permanent"),
]
FIB_CHANGE_AT, FIB_BUMP_AFTER = CASES // 2, 40
# Later (FIB_PAUSE_AT) 2.1 becomes unreachable and R1's IPv6 neighbour entry goes, with no
# fib_gen bump this time (no control plane): the run waits FIB_HOP_TTL_NS, so every answer
# kept has expired. FIB_PAUSE_CASES frames before and after it run without a bump and all
# from lb0 (an answer is kept for one ingress: one from lb1 would ask and replace it), so
# that answers count enough uses to read the clock (every FIB_HOP_USES), find it expired
# and ask again.
FIB_PAUSE_CHANGES = [
    ("route", "replace", "unreachable", "198.18.2.1"),
    ("neigh", "del", "fd00:198:18:1:1::2", "dev", "lb0"),
]
FIB_PAUSE_AT, FIB_PAUSE_CASES = 2 * CASES // 3 + CASES // 6, 400
# The model has no clock: otherwise fib_gen is bumped before every FIB_BUMP_EVERY-th case
# (at 50, 150, ...: the index reused at CASES // 3 then meets the kept answer of its former
# backend), and sooner if FIB_BUMP_S have passed, so no other answer lives long enough to
# expire. Inside the pause's window a bump would reset the answers that must count
# their uses: there the run waits FIB_HOP_TTL_NS instead and marks every answer expired.
FIB_BUMP_EVERY, FIB_BUMP_S = 100, consts.FIB_HOP_TTL_NS / 1e9 * 0.6
LB1_SHARE = 0.25  # frames that come in on lb1 rather than lb0
NUD_VALID = {"PERMANENT", "NOARP", "REACHABLE", "PROBE", "STALE", "DELAY"}


def _mac(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.split(":"))


class NamespaceFib:
    """The kernel FIB of a FibNet namespace as `ip -j` shows its routes (the
    local table, then main: longest prefix, lowest metric), neighbours, links
    and per-interface forwarding, asked as bpf_fib_lookup is from XDP: from
    the ingress interface, the egress MTU checked before the neighbour."""

    def __init__(self, net: FibNet):
        self.net = net
        self.read()

    def _ip(self, *args: str):
        r = subprocess.run(["ip", "-n", self.net.ns, "-j", *args], capture_output=True, text=True, check=True)
        return json.loads(r.stdout or "[]")

    def read(self) -> None:
        self.links = {ln["ifname"]: ln for ln in self._ip("link", "show")}
        self.by_index = {ln["ifindex"]: ln for ln in self.links.values()}
        self.routes = {}
        for fam in (4, 6):
            for table in ("local", "main"):
                rows = []
                for rt in self._ip(f"-{fam}", "route", "show", "table", table):
                    dst = "::/0" if rt["dst"] == "default" and fam == 6 else \
                        "0.0.0.0/0" if rt["dst"] == "default" else rt["dst"]
                    rows.append((ipaddress.ip_network(dst), rt))
                self.routes[(fam, table)] = rows
        self.neigh = {(n["dev"], ipaddress.ip_address(n["dst"])): n for n in self._ip("neigh", "show")}

        def forwarding(ifname, fam):
            path = f"/proc/sys/net/ipv{fam}/conf/{ifname}/forwarding"  # per namespace: read on its thread
            return self.net.node.run(lambda: open(path).read().strip()) == "1"

        self.forwarding = {(ln["ifindex"], fam): forwarding(name, fam)
                           for name, ln in self.links.items() for fam in (4, 6)}

    def _route(self, fam: int, dst):
        for table in ("local", "main"):
            best = None
            for net, rt in self.routes[(fam, table)]:
                if dst in net and (best is None or (net.prefixlen, -rt.get("metric", 0)) >
                                   (best[0].prefixlen, -best[1].get("metric", 0))):
                    best = (net, rt)
            if best:
                return best[1]
        return None

    def __call__(self, ingress: int, address: str, outer_len: int) -> refmodel.FibAnswer:
        dst = ipaddress.ip_address(address)
        fam = dst.version
        if not self.forwarding[(ingress, fam)]:
            return refmodel.FibAnswer(refmodel.FIB_FAIL, why="forwarding off on the ingress")
        rt = self._route(fam, dst)
        if rt is None:
            return refmodel.FibAnswer(refmodel.FIB_FAIL, why="no route")
        if rt.get("type", "unicast") != "unicast":
            return refmodel.FibAnswer(refmodel.FIB_FAIL, why=rt["type"])
        link = self.links[rt["dev"]]
        mtu = next((m["mtu"] for m in rt.get("metrics", []) if "mtu" in m), link["mtu"])
        if outer_len > mtu:
            return refmodel.FibAnswer(refmodel.FIB_FAIL, why=f"{outer_len} > egress MTU {mtu}")
        hop = ipaddress.ip_address(rt["gateway"]) if "gateway" in rt else dst
        n = self.neigh.get((rt["dev"], hop))
        if n is None or "lladdr" not in n or not NUD_VALID & set(n.get("state", [])):
            return refmodel.FibAnswer(refmodel.FIB_NO_NEIGH, link["ifindex"], why=f"{hop} on {rt['dev']}")
        return refmodel.FibAnswer(refmodel.FIB_SENT, link["ifindex"], _mac(n["lladdr"]), _mac(link["address"]),
                                  why=f"{hop} on {rt['dev']}")


class FibRun:
    """The balancer in next_hop fib inside a FibNet: the namespace's thread
    (pinned to one CPU: answers are kept per CPU) runs the packets, from lb0
    or lb1, both in tx_ports."""

    def __init__(self, lb, seed: int):
        assert refmodel.FIB_HOP_USES == consts.FIB_HOP_USES
        self.lb = lb
        self.r = random.Random(seed)  # its own: the frames are those of the gateway run
        self.net = FibNet()
        try:
            self.net.node.run(os.sched_setaffinity, 0, {min(os.sched_getaffinity(0))})
            for dst, *how in FIB_ROUTES:
                self.net.ip("route", "add", *(how[:1] + [dst] if how[0] == "unreachable" else [dst] + how))
            self.net.node.run(lb.dp.set_tx_ports, [self.net.lb0, self.net.lb1])
            lb.configure(next_hop="fib")
            self.oracle = NamespaceFib(self.net)
            self.mode = refmodel.FibMode(self.oracle, frozenset({self.net.lb0, self.net.lb1}), self.net.lb0)
            self.last_bump = time.monotonic()
        except BaseException:
            self.net.close()
            raise

    def close(self) -> None:
        self.net.close()

    def bump(self) -> None:
        """What `l4lb run` does after rtnetlink events."""
        self.lb.dp.bump_fib_gen()
        self.mode.gen += 1
        self.last_bump = time.monotonic()

    def wait_out(self) -> None:
        """Waits FIB_HOP_TTL_NS, so every answer kept has expired, and tells the model."""
        time.sleep(consts.FIB_HOP_TTL_NS / 1e9 + 0.1)
        self.mode.expire_all()
        self.last_bump = time.monotonic()  # the answers asked from now on are young

    def configured(self) -> None:
        """A configuration write bumped fib_gen."""
        self.mode.gen += 1
        self.last_bump = time.monotonic()

    def before(self, i: int, frame: bytes) -> bytes:
        """Route changes and bumps due before case i; its ingress (a frame for lb1 is addressed to it)."""
        if i == FIB_CHANGE_AT:
            for change in FIB_CHANGES:
                self.net.ip(*change)
            self.oracle.read()
        if i == FIB_PAUSE_AT:
            for change in FIB_PAUSE_CHANGES:
                self.net.ip(*change)
            self.oracle.read()
            self.wait_out()
        paused = abs(i - FIB_PAUSE_AT) < FIB_PAUSE_CASES
        if i == FIB_CHANGE_AT + FIB_BUMP_AFTER or (i % FIB_BUMP_EVERY == FIB_BUMP_EVERY // 2 and not paused):
            self.bump()
        elif time.monotonic() - self.last_bump > FIB_BUMP_S:
            # answers about to expire unannounced: a bump, but not around the pause,
            # whose kept answers must keep counting uses (a slow machine gets there)
            if paused:
                self.wait_out()
            else:
                self.bump()
        self.mode.ingress = self.net.lb1 if self.r.random() < LB1_SHARE and not paused else self.net.lb0
        if self.mode.ingress == self.net.lb1 and frame[0:6] == _mac(LB0_MAC):
            frame = _mac(LB1_MAC) + frame[6:]
        return frame

    def run(self, frame: bytes):
        r = self.net.node.run(libbpf.run, self.lb.prog.fd, frame, ifindex=self.mode.ingress)
        age = time.monotonic() - self.last_bump
        assert age < consts.FIB_HOP_TTL_NS / 1e9, \
            f"{age:.2f} s since fib_gen was bumped: kept answers may have expired unannounced (the model has no clock)"
        return r

    def paths(self, exp: refmodel.Expected) -> list[tuple[str, bool]]:
        """Paths of next_hop fib the run must reach, and whether exp took each."""
        trace = " > ".join(exp.trace)
        lb0 = self.mode.ingress == self.net.lb0
        fresh = "FIB: sent" in trace
        return [
            ("fib: TX, asked, from lb0", fresh and exp.verdict == "TX" and lb0),
            ("fib: TX, asked, from lb1", fresh and exp.verdict == "TX" and not lb0),
            ("fib: redirect, asked, lb0 to lb1", fresh and exp.verdict == "REDIRECT" and lb0),
            ("fib: redirect, asked, lb1 to lb0", fresh and exp.verdict == "REDIRECT" and not lb0),
            ("fib: TX, kept", "next hop kept" in trace and exp.verdict == "TX"),
            ("fib: redirect, kept", "next hop kept" in trace and exp.verdict == "REDIRECT"),
            ("fib: kept past a route change", "the FIB now says" in trace),
            ("fib: an index given to another backend asks again", "kept answer was for" in trace),
            ("fib: an answer found expired asks again", "kept answer has expired" in trace),
            ("fib: expired, its new answer did not send, asks again", "emptied at its expiry" in trace),
            ("fib: no neighbour, passed", "FIB: no_neigh" in trace and exp.verdict == "PASS"),
            ("fib: unreachable, dropped", "FIB: fail unreachable" in trace),
            ("fib: egress not in tx_ports, dropped", "not in tx_ports" in trace),
            ("fib: too big for the egress, dropped", "> egress MTU" in trace),
            ("fib: VLAN frame sent", "vlan" in trace and exp.verdict in ("TX", "REDIRECT")),
            ("fib: ICMP error forwarded", "ICMP error" in trace and exp.verdict in ("TX", "REDIRECT")),
            ("fib: GUE sent", (exp.kind or "").startswith("gue") and exp.verdict in ("TX", "REDIRECT")),
        ]


# --- running and comparing ------------------------------------------------------------------


def configure(lb):
    lb.few_backend_indices(BACKEND_INDICES)
    lb.configure(mtu=MTU, new_flow_rate=1_000_000_000, icmp_rate=1_000_000_000, udp_timeout_s=3600)
    for (addr, port, proto), backends, flags, *encap in VIPS:
        lb.add_vip(addr, port, proto, backends, flags, *encap)


def reconfigure(lb, gen: Generator, stage: int) -> None:
    if stage == 1:
        index, generation = lb.index_of("198.18.2.3")
        lb.set_backends(*V4_TCP, {"198.18.2.1": 1, "198.18.2.2": 1})
        lb.set_backends(*V4_TCP, {"198.18.2.1": 1, "198.18.2.2": 1, "198.18.2.5": 1})
        assert lb.index_of("198.18.2.5") == (index, generation + 1), "the freed index is reused"
    elif stage == 2:
        lb.set_backends(*V4_UDP_ANY, {"198.18.2.4": 1})
        lb.set_backends(*V6_TCP, {"fd00:198:18:2::1": 1, "fd00:198:18:2::2": 0})
        lb.configure(mtu=LATER_MTU, gue_port=7777)
        lb.state.set_encap(VipKey.parse(*V4_TCP), "gue")
        gen.mtu = LATER_MTU


def model_of(lb, conntrack=None, fib: refmodel.FibMode | None = None, syn=None) -> LbModel:
    return LbModel.from_state(lb.state, lb.config, lb.capacity.ring_size, conntrack, fib, syn)


def _flow_of(family: int, key) -> Flow:
    """A connection-table key (flow4_key, flow_key) as the model's Flow."""
    if family == 4:
        src, dst, sport, dport, proto = struct.unpack("!4s4sHHB3x", bytes(key))
        return Flow(4, src, dst, sport, dport, proto)
    src, dst, sport, dport, proto, fam, _ = struct.unpack("!16s16sHHBBH", bytes(key))
    return Flow(fam, src, dst, sport, dport, proto)


def kernel_tables(lb, model: LbModel) -> dict[str, dict]:
    """The kernel's connection table in the model's terms, Flow -> CtEntry: its
    buckets, its SYN tables, and both as user space shows them (merged)."""
    out = {"buckets": {}, "SYN table": {}, "merged": {}}
    for fam in (4, 6):
        t = lb.dp.conntrack_table(fam)
        for view, items in (("buckets", t.bucket_items()), ("SYN table", t.syn_items()), ("merged", t.items())):
            for k, v in items:
                addr = model.backends.get(v.backend, ("?", 0))[0]
                out[view][_flow_of(fam, k)] = CtEntry(v.backend, v.generation, addr)
    return out


def adopt_kernel_tables(lb, model: LbModel) -> None:
    """Goes on from the kernel's table (after a mismatch)."""
    kernel = kernel_tables(lb, model)
    model.conntrack = kernel["buckets"]
    model.syn = {f.syn_slot(): (f, e) for f, e in kernel["SYN table"].items()}


def check_conntrack(lb, model: LbModel) -> None:
    """The kernel's buckets and SYN tables hold exactly the model's flows, each
    with the same backend index and generation, each SYN-table flow in the
    model's slot; user space's one mapping of both is the model's."""
    kernel = kernel_tables(lb, model)
    mine = {"buckets": model.conntrack, "SYN table": dict(model.syn.values()), "merged": model.entries()}
    problems = []
    for view, entries in kernel.items():
        k = {f: (e.index, e.generation) for f, e in entries.items()}
        m = {f: (e.index, e.generation) for f, e in mine[view].items()}
        if k != m:
            differ = [(str(f), k[f], m[f]) for f in k.keys() & m.keys() if k[f] != m[f]]
            problems.append(f"{view}: kernel only {[str(f) for f in k.keys() - m.keys()]}, "
                            f"model only {[str(f) for f in m.keys() - k.keys()]}, differing {differ}")
    for f in kernel["SYN table"]:
        t = lb.dp.conntrack_table(f.family)
        if bytes(t.syn[t.syn.Key(f.syn_slot()[1])].key) != f.key():
            problems.append(f"SYN table: {f} is not in its slot {f.syn_slot()}")
    assert not problems, "connection table: " + "; ".join(problems)


def flow_entries_differ(lb, model: LbModel, flow: Flow) -> list[str]:
    """After a packet of the flow: the entry user space shows for the flow,
    and what the flow's SYN slot holds, if they differ from the model's."""
    t = lb.dp.conntrack_table(flow.family)
    slot = flow.syn_slot()
    way = t.syn[t.syn.Key(slot[1])]
    held = model.syn.get(slot)
    kernel = (str(_flow_of(flow.family, way.key)), way.e.backend, way.e.generation) if way.e.backend else None
    mine = (str(held[0]), held[1].index, held[1].generation) if held else None
    e = t.get(t.Key.from_buffer_copy(flow.key()))
    own = held[1] if held and held[0] == flow else model.conntrack.get(flow)
    kernel_own = (e.backend, e.generation) if e is not None else None
    mine_own = (own.index, own.generation) if own is not None else None
    problems = []
    if kernel != mine:
        problems.append(f"SYN slot {slot[1]} holds (flow, index, generation) {kernel}, model {mine}")
    if kernel_own != mine_own:
        problems.append(f"the flow's entry (index, generation): {kernel_own}, model {mine_own}")
    return problems


def icmp_reads_padding(frame: bytes) -> bool:
    """An ICMP packet followed by Ethernet padding whose ICMP header, or the
    quoted header and ports of an ICMP error, do not fit in the IP length:
    the bytes in the padding must not be read as part of the packet."""
    if len(frame) < 14:
        return False
    l3 = 18 if frame[12:14] in (b"\x81\x00", b"\x88\xa8") else 14
    et = frame[l3 - 2:l3]
    if et == b"\x08\x00" and len(frame) >= l3 + 20 and frame[l3] >> 4 == 4 and frame[l3] & 15 >= 5:
        ihl, end = (frame[l3] & 15) * 4, l3 + int.from_bytes(frame[l3 + 2:l3 + 4], "big")
        if frame[l3 + 9] != 1 or int.from_bytes(frame[l3 + 6:l3 + 8], "big") & 0x3FFF or \
                not l3 + ihl <= end <= len(frame):
            return False
        l4, errors = l3 + ihl, (3,)
        q = l4 + 8
        need = 8 + (max(20, (frame[q] & 15) * 4) if len(frame) > q else 20) + 4
    elif et == b"\x86\xdd" and len(frame) >= l3 + 40 and frame[l3] >> 4 == 6:
        end = l3 + 40 + int.from_bytes(frame[l3 + 4:l3 + 6], "big")
        if frame[l3 + 6] != 58 or end > len(frame):
            return False
        l4, errors, need = l3 + 40, (1, 2), 8 + 44
    else:
        return False
    if end == len(frame):
        return False  # no padding: nothing to read beyond the packet
    if end - l4 < 8:
        return True
    return frame[l4] in errors and end - l4 < need


def paths(exp: refmodel.Expected, model: LbModel) -> list[tuple[str, bool]]:
    """Finer paths the run must reach at least once, and whether exp took each."""
    trace = " > ".join(exp.trace)
    over = re.search(r"SYN-table hit -> (\S+), promoted over the buckets' entry -> (\S+)", trace)
    return [
        ("stale: backend gone", "ct stale" in trace and "backend gone" in trace),
        ("stale: generation changed", "ct stale" in trace and "generation" in trace),
        ("hit on a drained backend", "ct hit -> fd00:198:18:2::2" in trace and model.mtu == LATER_MTU),
        ("RST: no insert", "RST: no insert" in trace),
        ("no_conntrack VIP", "no_conntrack VIP" in trace),
        ("ICMP error: hit", "ICMP error" in trace and "ct hit" in trace),
        ("ICMP error: no insert", "ICMP error: no insert" in trace),
        ("exact port over port-less", exp.vip_id is not None and "VIP 198.18.10.11:53/" in trace),
        ("IPv4 options", "ihl=" in trace and exp.verdict == "TX"),
        ("Ethernet padding kept", "pad=" in trace and exp.backend is not None),
        ("VLAN encapsulated", "vlan" in trace and exp.backend is not None),
        ("VLAN too big", "vlan" in trace and (exp.kind or "").startswith("too_big")),
        ("IPv4 too big without DF", "no DF: sent" in trace),
        ("too_big6 at the IPv6 minimum MTU", exp.kind == "too_big6" and model.mtu == LATER_MTU),
        ("GUE established", "ct hit" in trace and (exp.kind or "").startswith("gue")),
        ("GUE too big", " gue" in trace and (exp.kind or "").startswith("too_big")),
        ("GUE ICMP error forwarded", "ICMP error" in trace and (exp.kind or "").startswith("gue")),
        ("an established flow turned GUE", "VIP 198.18.10.10:80/6 (id 0) gue > ct hit" in trace),
        ("SYN table: promoted by the flow's next packet", "SYN-table hit" in trace and "promoted" in trace),
        ("SYN table: used by an ICMP error, not moved", "stays in the SYN table" in trace),
        ("SYN table: stale, its backend replaced since the SYN",
         "SYN-table entry stale" in trace and "generation" in trace),
        ("SYN table: a SYN over another flow's entry", exp.counters.get("ct_syn_evict", 0) == 1),
        ("SYN table: a flow's new SYN taken over its bucket entry", over is not None),
        ("SYN table: a flow's new SYN taken over its bucket entry of another backend",
         over is not None and over[1] != over[2]),
    ]


def vip_counters(lb, ids) -> dict:
    return {i: lb.dp.vip_stats(i) for i in ids}


def describe_frame(frame: bytes) -> str:
    try:
        return Ether(frame).summary()
    except Exception as e:  # scapy cannot always dissect what the generator makes
        return f"(scapy: {e})"


def compare(exp: refmodel.Expected, verdict: str, out: bytes, frame: bytes, gdelta: dict, vdelta: dict) -> list[str]:
    problems = []
    if verdict != exp.verdict:
        problems.append(f"verdict {verdict}, model says {exp.verdict}")
    want = exp.deltas()
    if gdelta != want:
        diff = {k: (gdelta[k], want[k]) for k in COUNTERS if gdelta[k] != want[k]}
        problems.append(f"global counters differ (kernel, model): {diff}")
    for vid, d in vdelta.items():
        w = {"packets": 1, "bytes": exp.vip_bytes} if vid == exp.vip_id else {"packets": 0, "bytes": 0}
        if d != w:
            problems.append(f"vip_stats[{vid}] moved {d}, model says {w}")
    if verdict == exp.verdict and exp.output is not None:
        if exp.backend is not None:  # spelled out, though the whole frame is compared below
            l2len = 18 if frame[12:14] in (b"\x81\x00", b"\x88\xa8") else 14
            dst = out[l2len + 16:l2len + 20] if exp.kind.endswith("4in4") else out[l2len + 24:l2len + 40]
            if len(out) < l2len + 40 or ipaddress.ip_address(dst) != ipaddress.ip_address(exp.backend):
                problems.append(f"outer destination {dst.hex()}, model's backend {exp.backend}")
            if out[exp.inner_offset:] != frame[l2len:]:
                problems.append("inner packet not intact")
        if out != exp.output:
            at = next((i for i in range(min(len(out), len(exp.output))) if out[i] != exp.output[i]),
                      min(len(out), len(exp.output)))
            problems.append(f"output frame differs from byte {at} (lengths {len(out)}, model {len(exp.output)}):\n"
                            f"      kernel {out[max(0, at - 8):at + 24].hex(' ')}\n"
                            f"      model  {exp.output[max(0, at - 8):at + 24].hex(' ')}")
    return problems


@pytest.mark.parametrize("next_hop", ["gateway", "fib"])
def test_random_frames_match_the_reference_model(lb, next_hop):
    configure(lb)
    with contextlib.ExitStack() as stack:
        fib = None
        if next_hop == "fib":
            fib = FibRun(lb, SEED + 1)
            stack.callback(fib.close)
        random_frames_match_the_reference_model(lb, fib)


def random_frames_match_the_reference_model(lb, fib: FibRun | None):
    assert refmodel.SYN_SLOTS == consts.CT_SYN_SLOTS
    rnd = random.Random(SEED)
    gen = Generator(rnd)
    model = model_of(lb, fib=fib and fib.mode)
    vip_ids = sorted(v.vip_id for v in lb.state.vips.values())
    before = lb.stats()
    vbefore = vip_counters(lb, vip_ids)
    failures, seen_counters, seen_kinds, seen_paths = [], Counter(), Counter(), Counter()
    stages = {CASES // 3: 1, 2 * CASES // 3: 2}
    held_back = 0
    straddling = {}
    for i in range(CASES):
        for at, stage in stages.items():
            if i == max(0, at - 3 * ACROSS_FLOWS):
                vip, flags, _ = ACROSS[stage]
                straddling[stage] = gen.straddle(stage, vip, ACROSS_FLOWS, flags)
        if i in stages:
            if not failures:  # else they are reported first, and the model went on from the kernel's table
                check_conntrack(lb, model)
            reconfigure(lb, gen, stages[i])
            gen.resume(stages[i], straddling.pop(stages[i]), ACROSS[stages[i]][2])
            if fib and stages[i] == 2:
                fib.configured()  # lb.configure wrote the configuration
            model = model_of(lb, model.conntrack, fib and fib.mode, model.syn)
        case = gen.case()
        if fib:
            case.frame = fib.before(i, case.frame)
        if icmp_reads_padding(case.frame):
            held_back += 1  # counted: the run must meet such frames
        exp = refmodel.expect(case.frame, model)
        r = fib.run(case.frame) if fib else lb.prog.run(case.frame)
        after, vafter = lb.stats(), vip_counters(lb, vip_ids)
        gdelta = {k: after[k] - before[k] for k in COUNTERS}
        vdelta = {v: {f: vafter[v][f] - vbefore[v][f] for f in ("packets", "bytes")} for v in vip_ids}
        before, vbefore = after, vafter
        problems = compare(exp, r.verdict_name, r.data, case.frame, gdelta, vdelta)
        if not problems:
            refmodel.commit(model, exp)
            if exp.flow is not None:
                problems = flow_entries_differ(lb, model, exp.flow)
        if problems:
            failures.append(
                f"case {i} (seed {SEED}): {case.desc}\n"
                f"  frame ({len(case.frame)} bytes) {case.frame.hex()}\n"
                f"  scapy: {describe_frame(case.frame)}\n" +
                (f"  ingress {fib.mode.ingress}, fib_gen +{fib.mode.gen}\n" if fib else "") +
                f"  model: {exp.describe()}\n" + "".join(f"  - {p}\n" for p in problems))
            adopt_kernel_tables(lb, model)
            if len(failures) >= 10:
                break
            continue
        seen_counters.update({k: v for k, v in exp.counters.items() if v})
        seen_kinds[exp.kind or exp.verdict] += 1
        seen_paths.update(path for path, hit in paths(exp, model) if hit)
        if fib:
            seen_paths.update(path for path, hit in fib.paths(exp) if hit)
    if not failures:
        check_conntrack(lb, model)
    assert not failures, (f"{len(failures)} frame(s) differ from the model "
                          f"(L4LB_PROPERTY_SEED={SEED}, L4LB_PROPERTY_CASES={CASES}):\n" + "\n".join(failures))
    # the generator must keep reaching every documented path
    want_counters = {"pass", "tx", "ct_hit", "ct_miss", "ct_stale", "ct_insert", "no_backend", "too_big",
                     "icmp_echo", "icmp_fwd", "fragment", "ext_header", "malformed", "ct_promote", "ct_syn_evict"}
    want_kinds = {"PASS", "DROP", "4in4", "4in6", "6in6", "gue4in4", "gue4in6", "gue6in6", "echo4", "echo6",
                  "too_big4", "too_big6"}
    if fib:
        want_counters |= {"fib_lookup", "redirect", "fib_no_neigh", "fib_drop"}
    missing = (want_counters - set(seen_counters)) | (want_kinds - set(seen_kinds)) | \
        ({p for p, _ in paths(refmodel.Expected("PASS"), model)} - set(seen_paths)) | \
        ({p for p, _ in fib.paths(refmodel.Expected("PASS"))} - set(seen_paths) if fib else set())
    assert not missing, (f"{CASES} cases never reached {sorted(missing)}: {dict(seen_counters)} "
                         f"{dict(seen_kinds)} {dict(seen_paths)}")
    assert held_back > 0, "no ICMP frame with headers reaching into padding was generated"
    print(f"\n{'next_hop fib: ' if fib else ''}{CASES} frames compared ({held_back} with ICMP headers reaching into padding), seed {SEED}: {dict(seen_kinds)}; "
          f"counters {dict(seen_counters)}; paths {dict(seen_paths)}")


# --- ICMP bounded by the IP length, not the frame (icmp_reads_padding) ---------------------------
#
# Frames shorter than 60 bytes are padded on the wire, so a short ICMP packet
# normally arrives with padding after it: headers are bounded by the IP
# length, and whatever lies in the padding is not part of the packet.


def _padded(frame: bytes, to: int = 60) -> bytes:
    return frame + bytes(max(0, to - len(frame)))


@pytest.mark.parametrize("family", [4, 6])
def test_icmp_echo_whose_header_lies_in_the_padding_is_malformed(lb, family):
    lb.add_vip(V4_TCP[0], 80, "tcp", {"198.18.2.1": 1})
    lb.add_vip(V6_TCP[0], 443, "tcp", {"fd00:198:18:2::1": 1})
    if family == 4:  # IP length: 20 + 4 bytes of ICMP (type 8, code 0, checksum)
        ip = IP(src="198.18.0.5", dst=V4_TCP[0], proto=1, len=24, flags="DF") / bytes.fromhex("0800f7ff")
        frame = _padded(l2(0x0800, None) + bytes(ip))
    else:  # payload length 4
        ip = IPv6(src="fd00:198:18::5", dst=V6_TCP[0], nh=58, plen=4) / bytes.fromhex("80000000")
        frame = _padded(l2(0x86DD, None) + bytes(ip), 70)
    exp = refmodel.expect(frame, model_of(lb))
    assert (exp.verdict, exp.deltas()["malformed"]) == ("DROP", 1)
    before = lb.stats()
    r = lb.prog.run(frame)
    after = lb.stats()
    assert (r.verdict_name, {k: after[k] - before[k] for k in COUNTERS}) == ("DROP", exp.deltas())


@pytest.mark.parametrize("family", [4, 6])
def test_icmp_error_whose_quoted_ports_lie_in_the_padding_passes(lb, family):
    lb.add_vip(V4_TCP[0], 80, "tcp", {"198.18.2.1": 1})
    lb.add_vip(V6_TCP[0], 443, "tcp", {"fd00:198:18:2::1": 1})
    ports = struct.pack("!HH", 80 if family == 4 else 443, 40000)
    if family == 4:  # the quote is the backend's reply VIP:80 -> client:40000, header only
        quote = bytes(IP(src=V4_TCP[0], dst="198.18.0.5", proto=6, len=40))
        pkt = IP(src="198.18.1.254", dst=V4_TCP[0]) / ICMP(type=3, code=4, nexthopmtu=1400) / quote
        frame = l2(0x0800, None) + bytes(pkt) + ports + bytes(16)
    else:
        quote = bytes(IPv6(src=V6_TCP[0], dst="fd00:198:18::5", nh=6, plen=20))
        pkt = IPv6(src="fd00:198:18:1::fe", dst=V6_TCP[0]) / ICMPv6PacketTooBig(mtu=1280) / quote
        frame = l2(0x86DD, None) + bytes(pkt) + ports + bytes(16)
    exp = refmodel.expect(frame, model_of(lb))
    assert (exp.verdict, exp.deltas()["pass"]) == ("PASS", 1)
    before = lb.stats()
    r = lb.prog.run(frame)
    after = lb.stats()
    assert (r.verdict_name, {k: after[k] - before[k] for k in COUNTERS}) == ("PASS", exp.deltas())
    assert r.data == frame
