"""Helpers for kernel fixture tests: the loaded balancer with empty maps, flows
and their predicted backends, and an encapsulation checker that reads every
outer field from the raw bytes and derives what it should be independently."""
from __future__ import annotations

import contextlib
import ipaddress
import os
import struct
import time
from dataclasses import dataclass, replace

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether

from l4lb import consts, flowhash, maglev
from l4lb.dataplane import Dataplane, RuntimeConfig
from l4lb.model import VipKey, VipSpec
from l4lb.state import LbState
from l4lb.testbed import inet_checksum

LB_MAC = "02:00:00:00:01:01"
CLIENT_MAC = "02:00:00:00:00:0c"
GW_MAC = "02:00:00:00:00:01"

CLIENT4 = "198.18.0.5"
CLIENT6 = "fd00:198:18::5"
VIP4 = "198.18.10.10"
VIP6 = "fd00:198:18:10::10"
ROUTER4 = "198.18.1.1"  # an LB-link address: not a VIP
ROUTER6 = "fd00:198:18:1::1"

PROTO = {"tcp": 6, "udp": 17}
# the first packet of a flow after its SYN: the entry the SYN left in the SYN
# table is used and moves into the connection table's buckets (xdp/conntrack.h)
PROMOTE = {"tx": 1, "ct_hit": 1, "ct_promote": 1}
ETH_IP, ETH_IPV6, ETH_VLAN = 0x0800, 0x86DD, 0x8100


@dataclass
class Result:
    verdict: str
    data: bytes
    moved: dict | None = None  # global counters that changed during the run

    @property
    def eth(self) -> Ether:
        return Ether(self.data)


def moved(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The counters that changed, with their change."""
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


inet_csum = inet_checksum  # RFC 1071, written out in l4lb.testbed rather than taken from scapy


@contextlib.contextmanager
def one_cpu():
    """Keeps this process on one CPU: the rate limits are per CPU, and a test
    run executes on the CPU of the calling thread."""
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(saved)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


@dataclass(frozen=True)
class Flow:
    """A client -> VIP flow, and the packets of it."""

    src: str = CLIENT4
    dst: str = VIP4
    sport: int = 40000
    dport: int = 80
    proto: str = "tcp"

    @property
    def v6(self) -> bool:
        return ":" in self.dst

    def hash(self, no_sport: bool = False, flags=()) -> int:
        """The flow's hash on a VIP with these flags (no_sport: no_source_port)."""
        flags = {*flags, "no_source_port"} if no_sport else flags
        return flowhash.vip_flow_hash(self.src, self.dst, self.sport, self.dport, PROTO[self.proto], flags)

    def ip(self, **kw):
        if self.v6:
            return IPv6(src=self.src, dst=self.dst, **kw)
        return IP(src=self.src, dst=self.dst, **kw)

    def l4(self, tcp_flags="S", payload=b""):
        if self.proto == "tcp":
            return TCP(sport=self.sport, dport=self.dport, flags=tcp_flags, seq=1000) / payload
        return UDP(sport=self.sport, dport=self.dport) / payload

    def packet(self, tcp_flags="S", payload=b"", vlan: int | None = None, **ipkw) -> Ether:
        """A frame of the flow; ipkw go to the IP layer (tos, flags, tc, fl...)."""
        eth = Ether(src=CLIENT_MAC, dst=LB_MAC)
        if vlan is not None:
            eth = eth / Dot1Q(vlan=vlan)
        return eth / self.ip(**ipkw) / self.l4(tcp_flags, payload)

    def with_(self, **kw) -> "Flow":
        return replace(self, **kw)


def predict(backends: dict[str, int], flow: Flow, ring_size: int, no_sport: bool = False,
            flags=()) -> str | None:
    """The backend the data plane should pick for a fresh flow (no entry)."""
    table = maglev.maglev_table(backends, ring_size)
    return table[flowhash.ring_slot(flow.hash(no_sport, flags), ring_size)]


def find_flow(backends: dict[str, int], want, ring_size: int, base: Flow = Flow(), start: int = 40000) -> Flow:
    """The first flow from `base` (varying the source port) whose predicted
    backend satisfies want(address)."""
    table = maglev.maglev_table(backends, ring_size)
    for sport in range(start, start + 20000):
        f = base.with_(sport=sport)
        if want(table[flowhash.ring_slot(f.hash(), ring_size)]):
            return f
    raise AssertionError("no flow found with the wanted backend")


def outer_source(net, hash_: int) -> str:
    """The outer source address for a flow hash: the prefix, with its host bits
    (the last 32 at most) taken from the hash word as the CPU stores it
    (little-endian), which is what xdp/encap.h does with raw network-order masks."""
    packed = bytearray(net.network_address.packed)
    host_bits = min(32, net.max_prefixlen - net.prefixlen)
    mask = ((1 << host_bits) - 1).to_bytes(4, "big")
    hb = hash_.to_bytes(4, "little")
    for i in range(4):
        j = len(packed) - 4 + i
        packed[j] = (packed[j] & ~mask[i] & 0xFF) | (hb[i] & mask[i])
    return str(ipaddress.ip_address(bytes(packed)))


def addr(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


class Lb:
    """The loaded program with helpers to configure it and run packets."""

    def __init__(self, program, capacity):
        self.prog = program
        self.capacity = capacity
        self.dp = Dataplane(program, capacity)
        self.config = RuntimeConfig(gateway_mac=GW_MAC)
        self.dp.clear()
        self.dp.write_config(self.config, portless_vips=0)
        self.state = LbState(capacity, self)

    # Sink: forward to the dataplane and keep the port-less count in the config
    def __getattr__(self, name):
        return getattr(self.dp, name)

    def put_vip(self, key, vip_id, flags, ring):
        self.dp.put_vip(key, vip_id, flags, ring)

    def configure(self, **changes) -> None:
        for k, v in changes.items():
            setattr(self.config, k, v)
        self.dp.write_config(self.config)

    def few_backend_indices(self, n: int) -> None:
        """Lets the state allocate backend indices 1..n only (the program has
        more), so that a test can make an index be reused. Call before add_vip."""
        assert not self.state.vips
        self.state = LbState(replace(self.capacity, max_backends=n), self)

    def add_vip(self, address, port, protocol, backends, flags=(), encap="ipip"):
        spec = VipSpec(VipKey.parse(address, port, protocol), frozenset(flags), dict(backends), encap)
        vip = self.state.add_vip(spec)
        self.dp.set_portless(self.state.portless)
        return vip

    def set_backends(self, address, port, protocol, backends) -> None:
        self.state.set_backends(VipKey.parse(address, port, protocol), dict(backends))

    def run(self, pkt) -> Result:
        raw = bytes(pkt)
        before = self.dp.global_stats()
        r = self.prog.run(raw)
        return Result(r.verdict_name, r.data, moved(before, self.dp.global_stats()))

    def stats(self) -> dict[str, int]:
        return self.dp.global_stats()

    # ---- connection table -------------------------------------------------------------
    def _ct(self, f: Flow):
        return self.dp.conntrack_table(consts.FAMILY_V6 if f.v6 else consts.FAMILY_V4)

    def _flow_key(self, f: Flow):
        t = self._ct(f)
        k = t.Key()
        if not f.v6:  # flow4_key
            k.src = int.from_bytes(ipaddress.ip_address(f.src).packed, "little")
            k.dst = int.from_bytes(ipaddress.ip_address(f.dst).packed, "little")
            k.sport = int.from_bytes(f.sport.to_bytes(2, "big"), "little")
            k.dport = int.from_bytes(f.dport.to_bytes(2, "big"), "little")
            k.proto = PROTO[f.proto]
            return k
        for name, a in (("src", f.src), ("dst", f.dst)):
            packed = ipaddress.ip_address(a).packed.ljust(16, b"\0")
            words = getattr(k, name)
            for i in range(4):
                words[i] = int.from_bytes(packed[4 * i:4 * i + 4], "little")
        k.sport = int.from_bytes(f.sport.to_bytes(2, "big"), "little")
        k.dport = int.from_bytes(f.dport.to_bytes(2, "big"), "little")
        k.proto = PROTO[f.proto]
        k.family = consts.FAMILY_V6 if f.v6 else consts.FAMILY_V4
        return k

    def ct_entry(self, f: Flow):
        """(backend index, generation) of the flow's entry, or None."""
        t = self._ct(f)
        try:
            v = t[self._flow_key(f)]
        except KeyError:
            return None
        return v.backend, v.generation

    def ct_put(self, f: Flow, index: int, generation: int) -> None:
        """Writes an entry as the data plane would (last_seen: now)."""
        t = self._ct(f)
        vip = self.vip_of(f)
        h = flowhash.vip_flow_hash(f.src, f.dst, f.sport, f.dport, PROTO[f.proto], vip.flags)
        t[self._flow_key(f)] = t.Leaf(backend=index, generation=generation, vip_id=vip.vip_id,
                                      vip_gen=self.state.vip_generations[vip.vip_id], hash=h,
                                      last_seen=time_ns_monotonic())

    def vip_of(self, f: Flow):
        """The VIP that a flow's packets match: exact port first, then port 0."""
        for port in (f.dport, 0):
            for key, v in self.state.vips.items():
                if (ipaddress.ip_address(key.address) == ipaddress.ip_address(f.dst)
                        and key.port == port and key.protocol == f.proto):
                    return v
        raise KeyError(f"no VIP for {f}")

    def in_syn_table(self, f: Flow) -> bool:
        """The flow's entry waits in the SYN table (its SYN was its last packet)."""
        t = self._ct(f)
        raw = bytes(self._flow_key(f))
        return raw in {bytes(k) for k, _ in t.syn_items()}

    def syn_evictions(self, flows) -> int:
        """How many SYNs of `flows`, sent in this order into an empty SYN table,
        find their slot holding another of them (ct_syn_evict)."""
        held: dict[tuple[bool, int], bytes] = {}
        n = 0
        for f in flows:
            raw = bytes(self._flow_key(f))
            slot = (f.v6, self._ct(f).syn_slot(raw))
            n += slot in held and held[slot] != raw
            held[slot] = raw
        return n

    def ct_count(self) -> int:
        return self.dp.conntrack_size()

    def index_of(self, address: str) -> tuple[int, int]:
        b = self.state.backends[str(ipaddress.ip_address(address))]
        return b.index, b.generation

    # ---- outputs ------------------------------------------------------------------------
    def check_encap(self, r: Result, sent, backend: str, hash_: int, encap: str = "ipip") -> bytes:
        """Asserts that r is `sent` encapsulated to `backend` (IP-in-IP, or
        GUE to the configured gue_port), field by field, and returns the outer
        IP header."""
        gue = encap == "gue"
        udp = 8 if gue else 0
        sent = bytes(sent)
        d = r.data
        assert r.verdict == "TX"
        assert d[0:6] == mac(self.config.gateway_mac), "destination MAC: the gateway"
        assert d[6:12] == sent[0:6], "source MAC: the NIC's own (the frame's destination)"
        l3 = 18 if struct.unpack("!H", sent[12:14])[0] in (ETH_VLAN, 0x88A8) else 14
        if l3 == 18:
            assert d[12:16] == sent[12:16], "VLAN tag (TPID, TCI) kept"
        inner = sent[l3:]
        inner_v = inner[0] >> 4
        if inner_v == 4:
            inner_len = struct.unpack("!H", inner[2:4])[0]
            inner_tos = inner[1]
            inner_df = bool(struct.unpack("!H", inner[6:8])[0] & 0x4000)
        else:
            inner_len = 40 + struct.unpack("!H", inner[4:6])[0]
            inner_tos = (struct.unpack("!I", inner[0:4])[0] >> 20) & 0xFF
            inner_df = True
        b = ipaddress.ip_address(backend)
        if b.version == 4:
            assert struct.unpack("!H", d[l3 - 2:l3])[0] == ETH_IP
            o = d[l3:l3 + 20]
            assert o[0] == 0x45, "version 4, IHL 5"
            assert o[1] == inner_tos, "TOS copied"
            assert struct.unpack("!H", o[2:4])[0] == inner_len + 20 + udp
            assert struct.unpack("!H", o[4:6])[0] == 0, "IP id"
            assert struct.unpack("!H", o[6:8])[0] == (0x4000 if inner_df else 0), "DF copied, no fragment"
            assert o[8] == 64, "TTL"
            assert o[9] == (17 if gue else 4), "protocol UDP (GUE) or IPIP"
            assert struct.unpack("!H", o[10:12])[0] == ipv4_header_csum(o), "header checksum"
            assert addr(o[12:16]) == outer_source(self.config.encap_v4, hash_)
            assert ipaddress.ip_address(o[12:16]) in self.config.encap_v4
            assert addr(o[16:20]) == str(b)
            if gue:
                self.check_gue(d[l3 + 20:l3 + 28], inner_len, hash_)
            assert d[l3 + 20 + udp:] == inner, "inner packet (and padding) intact"
        else:
            assert struct.unpack("!H", d[l3 - 2:l3])[0] == ETH_IPV6
            o = d[l3:l3 + 40]
            w0 = struct.unpack("!I", o[0:4])[0]
            assert w0 >> 28 == 6
            assert (w0 >> 20) & 0xFF == inner_tos, "traffic class copied"
            assert w0 & 0xFFFFF == hash_ & 0xFFFFF, "flow label: the flow hash"
            assert struct.unpack("!H", o[4:6])[0] == inner_len + udp, "payload length"
            assert o[6] == (17 if gue else 4 if inner_v == 4 else 41), "next header: UDP (GUE), 4in6 or 6in6"
            assert o[7] == 64, "hop limit"
            assert addr(o[8:24]) == outer_source(self.config.encap_v6, hash_)
            assert ipaddress.ip_address(o[8:24]) in self.config.encap_v6
            assert addr(o[24:40]) == str(b)
            if gue:
                self.check_gue(d[l3 + 40:l3 + 48], inner_len, hash_)
            assert d[l3 + 40 + udp:] == inner, "inner packet (and padding) intact"
        return o

    def check_gue(self, u: bytes, inner_len: int, hash_: int) -> None:
        """The GUE UDP header: source port from the flow hash in 49152-65535,
        the configured destination port, length, checksum 0."""
        sport, dport, length, check = struct.unpack("!HHHH", u)
        assert sport == gue_source_port(hash_), "source port: from the flow hash"
        assert 49152 <= sport <= 65535
        assert dport == self.config.gue_port, "destination port: gue_port"
        assert length == inner_len + 8, "UDP length: header and the inner packet"
        assert check == 0, "UDP checksum 0"


def gue_source_port(hash_: int) -> int:
    """The GUE source port a flow hash gives: its low 14 bits over 49152."""
    return 49152 + (hash_ & 0x3FFF)


def ipv4_header_csum(hdr: bytes) -> int:
    """The checksum an IPv4 header should carry: computed with its field zeroed."""
    return inet_csum(hdr[:10] + b"\0\0" + hdr[12:])


def mac(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.split(":"))


def time_ns_monotonic() -> int:
    """bpf_ktime_get_ns() is CLOCK_MONOTONIC."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def outer_dst(data: bytes) -> str:
    """Backend address of an encapsulated frame (untagged), read from the raw bytes."""
    if data[12:14] == b"\x08\x00":
        return addr(data[30:34])
    return addr(data[38:54])
