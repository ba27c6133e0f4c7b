"""A reference model of the balancer's documented behaviour (docs/dataplane.md).

`expect(frame, model)` reads a raw Ethernet frame with nothing but byte
offsets and returns what the data plane should do with it: the verdict, the
exact change of every global counter, the VIP counters, and for XDP_TX (and
for next_hop fib XDP_REDIRECT, and the encapsulated XDP_PASS of a next hop
without a neighbour) the whole output frame (with the backend and the
encapsulation kind for packets sent to a backend). It does not change the
model: `commit(model, expected)` applies the connection-table write that the
packet makes, and in next_hop fib the FIB answer it keeps.

The connection table is two tables, as docs/dataplane.md ("The SYN table")
has it: the buckets (`LbModel.conntrack`, flow -> entry) and the SYN tables
(`LbModel.syn`, (family, slot) -> (flow, entry); slot = the hash of the
flow's key bytes mod SYN_SLOTS). A TCP packet with the SYN flag that takes
a fresh pick and writes an entry writes its slot, over whatever the slot
held (ct_syn_evict when that was another flow's); any other such packet
writes the buckets. A packet that is not a SYN looks in its flow's slot
first: an entry there is newer than the buckets'; a usable one moves into
the buckets (ct_promote), an unusable one is dropped (ct_stale), and either
way the slot is emptied (an ICMP error about the flow uses a usable one and
leaves it there). A slot that does not hold the flow sends the
lookup on to the buckets. `LbModel.entries()` is the one mapping that user
space shows (l4lb.conntrack.CtTable.items()).

next_hop fib (`LbModel.fib`, a FibMode): the kernel's FIB is an oracle the
caller gives, FibMode.answer(ingress ifindex, outer destination, outer IP
length) -> FibAnswer (a route with its neighbour: egress and MACs; no
neighbour; anything else), which the test derives from the routes and
neighbours it configured. The model keeps, as the spec says, the last answer
that sent a packet per backend index, used while fib_gen is the one it was
asked under (the caller counts the bumps in FibMode.gen: every configuration
write and every bump_fib_gen), the ingress is the same and the index still
holds the same backend (user space empties an index's answers when it gives
the index to another backend). Expiry: an answer counts its uses and reads
the clock at every FIB_HOP_USES-th; the model has no clock, so the caller
says when every answer kept has expired (FibMode.expire_all, after waiting
FIB_HOP_TTL_NS) and otherwise keeps every answer younger than that (bumping
fib_gen often enough); an answer found expired is emptied. It models one
CPU: the kernel keeps answers per CPU, so the caller pins the thread that
runs the packets.

The model is deliberately written from the spec, not from the C: it shares no
code with xdp/ and uses l4lb only for the documented hashes (l4lb.flowhash,
and l4lb.conntrack.key_hash for the SYN-table slot) and the Maglev table
(l4lb.maglev.maglev_table). What it leaves out: the rate limits (the test
configures them out of reach), UDP expiry (the test uses a long timeout),
evictions from full buckets (the test stays far below the table size:
ct_evict stays 0), ways and slots busy on another CPU (one CPU: ct_busy
stays 0), VIP generations (the test adds and deletes no VIP while it runs),
helper failures (BPF_PROG_TEST_RUN always leaves headroom), an unconfigured
program, and in next_hop fib the clock (the caller tells of expiry, above)
and more than one CPU.

Where the spec is silent the model takes these readings:
- every XDP_PASS of a configured program counts `pass` (but next_hop fib's, below);
- a quoted IPv4 header must say version 4 and IHL >= 5; a quoted IPv6
  header's version is not looked at;
- an ICMP error about a VIP flow is never answered with "too big" (it is
  forwarded whatever its size; generated errors stay far below the MTU);
- in next_hop fib a packet that the next hop does not send (no neighbour,
  drop) counts neither `tx` nor `icmp_fwd`, and its XDP_PASS counts no `pass`;
  the outer length the FIB checks against the egress MTU is the outer IP
  packet's (Ethernet padding after the inner packet left out).
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field, replace
from typing import Callable

from l4lb import flowhash, maglev
from l4lb.conntrack import key_hash

PASS, DROP, TX, REDIRECT = "PASS", "DROP", "TX", "REDIRECT"

COUNTERS = ("pass", "tx", "ct_hit", "ct_miss", "ct_stale", "ct_insert", "ct_limited",
            "no_backend", "too_big", "icmp_echo", "icmp_fwd", "icmp_limited", "fragment",
            "ext_header", "malformed", "error", "fib_no_neigh", "fib_drop", "redirect", "fib_lookup",
            "ct_evict", "ct_busy", "ct_promote", "ct_syn_evict")

# what the kernel's FIB answers (next_hop fib)
FIB_SENT, FIB_NO_NEIGH, FIB_FAIL = "sent", "no_neigh", "fail"
FIB_HOP_USES = 64  # a kept answer reads the clock once every so many uses

ETH_IP, ETH_IPV6, ETH_8021Q, ETH_8021AD = 0x0800, 0x86DD, 0x8100, 0x88A8
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
IPV6_EXT_HEADERS = frozenset({0, 43, 44, 50, 51, 60, 135, 139, 140})
TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10
OUTER_TTL = 64
IPV6_MIN_MTU = 1280
SYN_SLOTS = 16384  # slots of each family's SYN table


# --- the configuration the data plane was given ------------------------------------


@dataclass(frozen=True)
class Flow:
    """client -> VIP, as the connection table keys it."""
    family: int      # 4 or 6
    src: bytes       # packed address
    dst: bytes
    sport: int
    dport: int
    proto: int

    def __str__(self) -> str:
        s, d = ipaddress.ip_address(self.src), ipaddress.ip_address(self.dst)
        return f"{s}:{self.sport} -> {d}:{self.dport}/{self.proto}"

    def key(self) -> bytes:
        """The connection table's key: IPv4 flow4_key (addresses, ports in
        network order, protocol, 3 bytes of padding), IPv6 flow_key (the same
        with 16-byte addresses, then the family and 2 bytes of padding)."""
        ports = struct.pack("!HHB", self.sport, self.dport, self.proto)
        if self.family == 4:
            return self.src + self.dst + ports + bytes(3)
        return self.src + self.dst + ports + bytes([self.family]) + bytes(2)

    def syn_slot(self) -> tuple[int, int]:
        """The flow's SYN-table slot: (family, index in the family's table)."""
        return self.family, key_hash(self.key()) % SYN_SLOTS


@dataclass(frozen=True)
class CtEntry:
    index: int
    generation: int
    address: str


@dataclass(frozen=True)
class Vip:
    address: str
    port: int
    proto: int
    vip_id: int
    no_sport: bool
    no_conntrack: bool
    table: tuple  # backend address (or None) per ring slot
    affinity: bool = False  # client_affinity: the addresses alone pick the backend
    gue: bool = False  # encap: gue (UDP to the node's gue_port), else IP-in-IP


@dataclass(frozen=True)
class FibAnswer:
    """The kernel FIB's answer for an outer packet: FIB_SENT (a route and
    its next hop's neighbour entry: egress interface, the next hop's MAC and
    the egress's MAC), FIB_NO_NEIGH (a route, no usable neighbour entry) or
    FIB_FAIL (anything else: no route, unreachable, forwarding off, too big
    for the egress MTU)."""
    result: str
    egress: int = 0
    dmac: bytes = b""
    smac: bytes = b""
    why: str = ""


@dataclass(frozen=True)
class KeptHop:
    backend: tuple     # (address, generation) of the backend it was asked for
    ingress: int
    gen: int           # fib_gen when asked
    answer: FibAnswer
    uses: int = FIB_HOP_USES  # uses left before the clock is read
    expired: bool = False     # the clock would say it has expired
    emptied: bool = False     # found expired: asked again until an answer sends


@dataclass
class FibMode:
    """next_hop fib: the FIB as an oracle and what the (one) CPU keeps."""
    answer: Callable[[int, str, int], FibAnswer]  # (ingress, outer destination, outer IP length)
    tx_ports: frozenset   # ifindexes that tx_port_slots lists
    ingress: int          # the ingress ifindex of the next frame
    gen: int = 0          # fib_gen, as the caller counts its bumps
    kept: dict = field(default_factory=dict)  # backend index -> KeptHop

    def expire_all(self) -> None:
        """FIB_HOP_TTL_NS has passed since the last packet: every answer kept has expired."""
        self.kept = {i: replace(k, expired=True) for i, k in self.kept.items()}


@dataclass
class LbModel:
    vips: dict           # (family, packed address, port, proto) -> Vip
    backends: dict       # index -> (address, generation) of every valid backend
    gw_mac: bytes
    encap_v4: ipaddress.IPv4Network
    encap_v6: ipaddress.IPv6Network
    mtu: int
    ring_size: int
    conntrack: dict = field(default_factory=dict)  # Flow -> CtEntry: the buckets
    syn: dict = field(default_factory=dict)        # (family, slot) -> (Flow, CtEntry): the SYN tables
    listed: dict = field(default_factory=dict)     # backend index -> ids of the VIPs that list it
    gue_port: int = 6080
    fib: FibMode | None = None  # next_hop fib; None: gateway

    @property
    def vip_addresses(self) -> set:
        return {(fam, addr) for fam, addr, _port, _proto in self.vips}

    @property
    def portless(self) -> bool:
        return any(port == 0 for _f, _a, port, _p in self.vips)

    def entries(self) -> dict:
        """Flow -> CtEntry of every flow with an entry: its SYN slot's when that
        holds it, else its bucket's."""
        out = dict(self.conntrack)
        out.update(self.syn.values())
        return out

    @classmethod
    def from_state(cls, state, runtime, ring_size: int, conntrack: dict | None = None,
                   fib: FibMode | None = None, syn: dict | None = None) -> "LbModel":
        """The model of a balancer configured through l4lb.state.LbState and a
        l4lb.dataplane.RuntimeConfig; the connection table (buckets and SYN
        tables) is carried over, and with runtime.next_hop fib the FibMode (its
        kept answers too)."""
        assert (runtime.next_hop == "fib") == (fib is not None), runtime.next_hop
        vips = {}
        for key, v in state.vips.items():
            ip = ipaddress.ip_address(key.address)
            table = tuple(maglev.maglev_table(v.backends, ring_size)) if v.backends else (None,) * ring_size
            vips[(ip.version, ip.packed, key.port, key.proto_number)] = Vip(
                key.address, key.port, key.proto_number, v.vip_id,
                "no_source_port" in v.flags, "no_conntrack" in v.flags, table,
                "client_affinity" in v.flags, v.encap == "gue")
        backends = {b.index: (addr, b.generation) for addr, b in state.backends.items()}
        listed = {b.index: {v.vip_id for v in state.vips.values() if addr in v.backends}
                  for addr, b in state.backends.items()}
        return cls(vips, backends, bytes(int(x, 16) for x in runtime.gateway_mac.split(":")),
                   runtime.encap_v4, runtime.encap_v6, runtime.mtu, ring_size,
                   dict(conntrack or {}), dict(syn or {}), listed, runtime.gue_port, fib)

    def index_of(self, address: str) -> tuple[int, int]:
        for idx, (addr, gen) in self.backends.items():
            if addr == address:
                return idx, gen
        raise KeyError(address)


# --- what the model predicts -----------------------------------------------------------


@dataclass
class Expected:
    verdict: str
    counters: dict = field(default_factory=dict)
    trace: list = field(default_factory=list)   # why, step by step
    vip_id: int | None = None                   # VIP whose packets/bytes count this frame
    vip_bytes: int = 0
    backend: str | None = None                  # TX to a backend: its address
    kind: str | None = None                     # 4in4, 4in6, 6in6 (gue4in4, ... for GUE), echo4, echo6,
                                                # too_big4, too_big6
    output: bytes | None = None                 # TX, REDIRECT: the whole frame sent; PASS: the input
                                                # (next_hop fib without a neighbour: the frame passed)
    inner_offset: int | None = None             # encapsulation: where the inner packet starts
    flow: Flow | None = None
    ct_write: tuple | None = None               # (Flow, CtEntry) written to the buckets
    syn_clear: tuple | None = None              # (family, slot) of the SYN table emptied
    syn_write: tuple | None = None              # ((family, slot), Flow, CtEntry) written to a SYN table
    fib_keep: tuple | None = None               # next_hop fib: (backend index, KeptHop) kept

    def count(self, name: str, n: int = 1) -> None:
        assert name in COUNTERS, name
        self.counters[name] = self.counters.get(name, 0) + n

    def deltas(self) -> dict:
        return {c: self.counters.get(c, 0) for c in COUNTERS}

    def describe(self) -> str:
        parts = [self.verdict, " > ".join(self.trace)]
        if self.backend:
            parts.append(f"backend {self.backend} ({self.kind})")
        elif self.kind:
            parts.append(self.kind)
        nz = {k: v for k, v in self.counters.items() if v}
        parts.append(f"counters {nz}")
        return "; ".join(parts)


def commit(model: LbModel, exp: Expected) -> None:
    """Applies the packet's effect on the connection table to the model."""
    if exp.syn_clear:
        del model.syn[exp.syn_clear]
    if exp.syn_write:
        slot, flow, entry = exp.syn_write
        model.syn[slot] = (flow, entry)
    if exp.ct_write:
        flow, entry = exp.ct_write
        model.conntrack[flow] = entry
    if exp.fib_keep:
        index, kept = exp.fib_keep
        model.fib.kept[index] = kept


# --- checksums ---------------------------------------------------------------------------


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return ~_fold(sum(struct.unpack(f"!{len(data) // 2}H", data))) & 0xFFFF


def checksum_update(check: int, old: int, new: int) -> int:
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m')."""
    return ~_fold((~check & 0xFFFF) + (~old & 0xFFFF) + new) & 0xFFFF


# --- parsing -------------------------------------------------------------------------------


def _be16(b: bytes, off: int) -> int:
    return (b[off] << 8) | b[off + 1]


@dataclass
class _Ip:
    family: int
    l3: int          # offset of the IP header
    l4: int          # offset after the IP header
    end: int         # offset where the IP packet ends (l3 + its length)
    ip_len: int
    src: bytes
    dst: bytes
    proto: int
    tos: int
    df: bool


def expect(frame: bytes, model: LbModel) -> Expected:
    """The documented fate of one frame, given the model's configuration and connection table."""
    n = len(frame)
    if n < 14:
        return _drop("malformed", f"frame of {n} bytes: Ethernet header truncated")
    etype, l3 = _be16(frame, 12), 14
    trace = []
    if frame[0] & 1:
        return _pass(frame, [f"destination MAC {frame[:6].hex(':')} is a group address"])
    if etype in (ETH_8021Q, ETH_8021AD):
        if n < 18:
            return _drop("malformed", f"VLAN tag truncated ({n} bytes)")
        etype, l3 = _be16(frame, 16), 18
        trace.append("vlan")
    if etype == ETH_IP:
        ip = _parse_ipv4(frame, l3, trace)
    elif etype == ETH_IPV6:
        ip = _parse_ipv6(frame, l3, trace)
    else:
        return _pass(frame, trace + [f"ethertype {etype:#06x} is not IP"])
    if isinstance(ip, Expected):
        return ip
    vip_addr = (ip.family, ip.dst) in model.vip_addresses
    trace.append("to a VIP address" if vip_addr else "not to a VIP address")

    if ip.family == 4:
        frag = _be16(frame, ip.l3 + 6) & 0x3FFF
        if frag:
            return _drop("fragment", *trace, "IPv4 fragment") if vip_addr else \
                _pass(frame, trace + ["IPv4 fragment"])
    if ip.family == 6 and ip.proto in IPV6_EXT_HEADERS:
        return _drop("ext_header", *trace, f"extension header {ip.proto}") if vip_addr else \
            _pass(frame, trace + [f"extension header {ip.proto}"])
    if (ip.family, ip.proto) in ((4, ICMP), (6, ICMPV6)):
        return _icmp(frame, ip, model, vip_addr, trace)
    if ip.proto not in (TCP, UDP):
        return _pass(frame, trace + [f"IP protocol {ip.proto}"])

    need = 20 if ip.proto == TCP else 8
    if ip.end - ip.l4 < need:  # ip.end <= len(frame) was checked
        what = f"{'TCP' if ip.proto == TCP else 'UDP'} header truncated ({ip.end - ip.l4} bytes)"
        return _drop("malformed", *trace, what) if vip_addr else _pass(frame, trace + [what])
    sport, dport = _be16(frame, ip.l4), _be16(frame, ip.l4 + 2)
    flags = frame[ip.l4 + 13] if ip.proto == TCP else 0
    flow = Flow(ip.family, ip.src, ip.dst, sport, dport, ip.proto)
    vip = _find_vip(model, flow)
    if vip is None:
        return _pass(frame, trace + [f"no VIP for {flow}"])
    return _balance(frame, ip, model, vip, flow, flags, icmp_error=False, trace=trace)


def _parse_ipv4(frame: bytes, l3: int, trace: list):
    n = len(frame)
    if n < l3 + 20:
        return _drop("malformed", *trace, "IPv4 header truncated")
    ver, ihl = frame[l3] >> 4, (frame[l3] & 0xF) * 4
    if ver != 4:
        return _drop("malformed", *trace, f"IPv4 ethertype, version {ver}")
    if ihl < 20:
        return _drop("malformed", *trace, f"IHL {ihl // 4}")
    tot = _be16(frame, l3 + 2)
    if tot < ihl:
        return _drop("malformed", *trace, f"tot_len {tot} < IHL*4 {ihl}")
    if l3 + tot > n:
        return _drop("malformed", *trace, f"tot_len {tot} beyond the frame ({n - l3} bytes of IP)")
    trace.append("ipv4" + (f" ihl={ihl}" if ihl != 20 else "") + (f" pad={n - l3 - tot}" if n > l3 + tot else ""))
    return _Ip(4, l3, l3 + ihl, l3 + tot, tot, frame[l3 + 12:l3 + 16], frame[l3 + 16:l3 + 20],
               frame[l3 + 9], frame[l3 + 1], bool(frame[l3 + 6] & 0x40))


def _parse_ipv6(frame: bytes, l3: int, trace: list):
    n = len(frame)
    if n < l3 + 40:
        return _drop("malformed", *trace, "IPv6 header truncated")
    ver = frame[l3] >> 4
    if ver != 6:
        return _drop("malformed", *trace, f"IPv6 ethertype, version {ver}")
    plen = _be16(frame, l3 + 4)
    if l3 + 40 + plen > n:
        return _drop("malformed", *trace, f"payload_len {plen} beyond the frame ({n - l3 - 40} bytes)")
    trace.append("ipv6" + (f" pad={n - l3 - 40 - plen}" if n > l3 + 40 + plen else ""))
    tclass = ((frame[l3] & 0xF) << 4) | (frame[l3 + 1] >> 4)
    return _Ip(6, l3, l3 + 40, l3 + 40 + plen, 40 + plen, frame[l3 + 8:l3 + 24],
               frame[l3 + 24:l3 + 40], frame[l3 + 6], tclass, True)


def _find_vip(model: LbModel, flow: Flow) -> Vip | None:
    vip = model.vips.get((flow.family, flow.dst, flow.dport, flow.proto))
    if vip is None and model.portless:
        vip = model.vips.get((flow.family, flow.dst, 0, flow.proto))
    return vip


# --- ICMP ------------------------------------------------------------------------------------


def _icmp(frame: bytes, ip: _Ip, model: LbModel, vip_addr: bool, trace: list) -> Expected:
    # "ICMP header truncated (< 8 bytes)": the header must lie inside the IP packet
    if ip.end - ip.l4 < 8:
        what = f"ICMP header truncated ({ip.end - ip.l4} bytes)"
        return _drop("malformed", *trace, what) if vip_addr else _pass(frame, trace + [what])
    typ = frame[ip.l4]
    echo, errors = (8, (3,)) if ip.family == 4 else (128, (1, 2))
    if typ == echo:
        if not vip_addr:
            return _pass(frame, trace + ["echo request"])
        return _echo(frame, ip, trace + ["echo request"])
    if typ not in errors:
        return _pass(frame, trace + [f"ICMP type {typ}"])
    trace = trace + [f"ICMP error type {typ}"]
    flow = _quoted_flow(frame, ip, trace)
    if flow is None:
        return _pass(frame, trace)
    vip = _find_vip(model, flow)
    if vip is None:
        return _pass(frame, trace + [f"no VIP for quoted flow {flow}"])
    return _balance(frame, ip, model, vip, flow, 0, icmp_error=True, trace=trace)


def _quoted_flow(frame: bytes, ip: _Ip, trace: list) -> Flow | None:
    """The flow an ICMP error is about: the quoted packet went VIP -> client,
    so the flow is the quote reversed. None (with the reason in trace) if the
    quote is not a TCP/UDP packet from the error's destination."""
    q, end = ip.l4 + 8, ip.end
    if ip.family == 4:
        if end < q + 20:
            trace.append("quoted IPv4 header truncated")
            return None
        ver, ihl, proto = frame[q] >> 4, (frame[q] & 0xF) * 4, frame[q + 9]
        if ver != 4 or ihl < 20:
            trace.append(f"quoted header version {ver} IHL {ihl // 4}")
            return None
        qsrc, qdst, ports = frame[q + 12:q + 16], frame[q + 16:q + 20], q + ihl
    else:
        if end < q + 40:
            trace.append("quoted IPv6 header truncated")
            return None
        # (the quoted IPv6 version is not checked: see the notes at the top)
        proto, qsrc, qdst, ports = frame[q + 6], frame[q + 8:q + 24], frame[q + 24:q + 40], q + 40
    if proto not in (TCP, UDP):
        trace.append(f"quoted protocol {proto}")
        return None
    if end < ports + 4:
        trace.append("quoted ports truncated")
        return None
    if qsrc != ip.dst:
        trace.append("quoted source is not the error's destination")
        return None
    return Flow(ip.family, qdst, qsrc, _be16(frame, ports + 2), _be16(frame, ports), proto)


def _echo(frame: bytes, ip: _Ip, trace: list) -> Expected:
    e = Expected(TX, trace=trace + ["echo reply"], kind=f"echo{ip.family}")
    e.count("icmp_echo")
    out = bytearray(frame)
    out[0:6], out[6:12] = frame[6:12], frame[0:6]
    c = ip.l4 + 2
    reply = 0 if ip.family == 4 else 129
    old = _be16(frame, ip.l4)
    new = (reply << 8) | frame[ip.l4 + 1]
    out[ip.l4] = reply
    out[c:c + 2] = checksum_update(_be16(frame, c), old, new).to_bytes(2, "big")
    if ip.family == 4:
        l3 = ip.l3
        old = _be16(frame, l3 + 8)
        out[l3 + 8] = OUTER_TTL
        out[l3 + 10:l3 + 12] = checksum_update(_be16(frame, l3 + 10), old, _be16(out, l3 + 8)).to_bytes(2, "big")
        out[l3 + 12:l3 + 16], out[l3 + 16:l3 + 20] = ip.dst, ip.src
    else:
        l3 = ip.l3
        out[l3 + 7] = OUTER_TTL
        out[l3 + 8:l3 + 24], out[l3 + 24:l3 + 40] = ip.dst, ip.src
    e.output = bytes(out)
    return e


# --- a VIP packet ------------------------------------------------------------------------------


def _balance(frame: bytes, ip: _Ip, model: LbModel, vip: Vip, flow: Flow, tcp_flags: int,
             icmp_error: bool, trace: list) -> Expected:
    e = Expected(DROP, trace=trace + [f"VIP {vip.address}:{vip.port}/{vip.proto} (id {vip.vip_id})" +
                                      (" gue" if vip.gue else "")],
                 vip_id=vip.vip_id, vip_bytes=len(frame), flow=flow)
    flags = {"no_source_port"} if vip.no_sport else set()
    flags |= {"client_affinity"} if vip.affinity else set()
    h = flowhash.vip_flow_hash(str(ipaddress.ip_address(flow.src)), str(ipaddress.ip_address(flow.dst)),
                               flow.sport, flow.dport, flow.proto, flags)
    use_ct = not vip.no_conntrack
    syn = flow.proto == TCP and tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    rst = flow.proto == TCP and bool(tcp_flags & TCP_RST)
    # a SYN always takes a fresh pick: a reused 5-tuple is a new connection
    backend = None if syn else _established(model, vip, flow, use_ct, icmp_error, e)
    # the outer IP header, and for GUE the UDP header after it
    udp = 8 if vip.gue else 0
    b_family = ipaddress.ip_address(backend).version if backend else None
    overhead = (20 if b_family == 4 else 40) + udp
    too_big = backend is not None and ip.ip_len + overhead > model.mtu and ip.df and not icmp_error
    if backend is None:
        e.count("ct_miss")
        slot = flowhash.ring_slot(h, model.ring_size)
        backend = vip.table[slot]
        e.trace.append(f"maglev slot {slot} -> {backend}")
        if backend is None:
            e.count("no_backend")
            return e
        b_family = ipaddress.ip_address(backend).version
        overhead = (20 if b_family == 4 else 40) + udp
        too_big = ip.ip_len + overhead > model.mtu and ip.df and not icmp_error
        if not use_ct:
            e.trace.append("no_conntrack VIP")
        elif icmp_error:
            e.trace.append("ICMP error: no insert")
        elif rst:
            e.trace.append("RST: no insert")
        elif too_big:
            e.trace.append("too big: answered with ICMP, no insert")
        else:
            _remember(model, flow, tcp_flags, backend, e)
    if too_big:
        e.verdict, e.kind = TX, f"too_big{ip.family}"
        e.count("too_big")
        e.trace.append(f"{ip.ip_len} + {overhead} > mtu {model.mtu}, DF")
        e.output = _too_big(frame, ip, model.mtu - overhead)
        return e
    if ip.ip_len + overhead > model.mtu:
        e.trace.append(f"{ip.ip_len} + {overhead} > mtu {model.mtu}, " +
                       ("an ICMP error" if icmp_error else "no DF: sent, outer DF clear"))
    e.verdict, e.backend = TX, backend
    e.kind = ("gue" if vip.gue else "") + {(4, 4): "4in4", (4, 6): "4in6", (6, 6): "6in6"}[(ip.family, b_family)]
    e.output, e.inner_offset = _encap(frame, ip, model, backend, h, vip.gue)
    if model.fib is not None:
        _next_hop_fib(e, model, frame[0:6], ip.ip_len + overhead)
    if e.verdict in (TX, REDIRECT):
        e.count("tx")
        if icmp_error:
            e.count("icmp_fwd")
    return e


def _established(model: LbModel, vip: Vip, flow: Flow, use_ct: bool, icmp_error: bool,
                 e: Expected) -> str | None:
    """The backend of the flow's entry if it is still usable (ct_hit), else
    None (ct_stale if there was one): a fresh pick follows. The flow's SYN
    slot first, whose entry is newer than the buckets' and leaves the slot
    either way: a usable one into the buckets (ct_promote), the others
    dropped; an ICMP error about the flow only uses a usable one."""
    slot = flow.syn_slot()
    held = model.syn.get(slot)
    in_syn = held is not None and held[0] == flow
    entry = held[1] if in_syn else model.conntrack.get(flow)
    if entry is None:
        return None
    if in_syn:
        e.syn_clear = slot
    if not use_ct:  # the VIP became no_conntrack since: it never uses the table
        if in_syn:
            e.trace.append("no_conntrack VIP: the SYN-table entry dropped")
        return None
    live = model.backends.get(entry.index)
    if live is None or live[1] != entry.generation or vip.vip_id not in model.listed.get(entry.index, ()):
        e.count("ct_stale")
        why = ("backend gone" if live is None else f"generation {entry.generation} != {live[1]}"
               if live[1] != entry.generation else f"not listed by VIP {vip.vip_id} any more")
        e.trace.append(f"{'SYN-table entry' if in_syn else 'ct'} stale ({entry.address}: {why})")
        return None
    e.count("ct_hit")
    if not in_syn:
        e.trace.append(f"ct hit -> {entry.address}")
        return entry.address
    if icmp_error:
        e.syn_clear = None
        e.trace.append(f"SYN-table hit -> {entry.address}, an ICMP error: stays in the SYN table")
        return entry.address
    e.count("ct_promote")
    e.ct_write = (flow, entry)
    older = model.conntrack.get(flow)
    e.trace.append(f"SYN-table hit -> {entry.address}, promoted" +
                   (f" over the buckets' entry -> {older.address}" if older else ""))
    return entry.address


def _remember(model: LbModel, flow: Flow, tcp_flags: int, backend: str, e: Expected) -> None:
    """A fresh pick's entry: a SYN's (SYN+ACK too) into its SYN slot, over
    whatever the slot holds; any other into the buckets."""
    idx, gen = model.index_of(backend)
    entry = CtEntry(idx, gen, backend)
    e.count("ct_insert")
    if flow.proto != TCP or not tcp_flags & TCP_SYN:
        e.ct_write = (flow, entry)
        return
    slot = flow.syn_slot()
    held = model.syn.get(slot)
    e.syn_write = (slot, flow, entry)
    e.trace.append("into the SYN table" + (" (the flow is in the buckets too)" if flow in model.conntrack else ""))
    if held is not None and held[0] != flow:
        e.count("ct_syn_evict")
        e.trace.append(f"over the SYN slot of {held[0]}")


def _next_hop_fib(e: Expected, model: LbModel, own_mac: bytes, outer_len: int) -> None:
    """next_hop fib: the encapsulated frame e.output sent by a kept answer or
    by the FIB's; sets the verdict, the MACs and the FIB's counters."""
    fib = model.fib
    index, generation = model.index_of(e.backend)
    kept, ans = fib.kept.get(index), None
    if kept is not None and kept.gen == fib.gen and kept.backend != (e.backend, generation):
        e.trace.append(f"the index's kept answer was for {kept.backend[0]}")
    elif kept is not None and kept.emptied:
        e.trace.append("the kept answer was emptied at its expiry")
    elif kept is not None and kept.gen == fib.gen and kept.ingress == fib.ingress:
        # a use: every FIB_HOP_USES-th reads the clock
        uses, expired = kept.uses - 1, False
        if uses == 0:
            uses, expired = FIB_HOP_USES, kept.expired
        e.fib_keep = (index, replace(kept, uses=uses, emptied=expired))
        if expired:
            e.trace.append("the kept answer has expired")
        elif kept.answer.egress == fib.ingress or kept.answer.egress in fib.tx_ports:
            ans = kept.answer
            now = fib.answer(fib.ingress, e.backend, outer_len)  # only to name the path
            e.trace.append("next hop kept" + ("" if now == ans else f" (the FIB now says {now.result} {now.why})"))
    if ans is None:
        e.count("fib_lookup")
        ans = fib.answer(fib.ingress, e.backend, outer_len)
        e.trace.append(f"FIB: {ans.result} {ans.why}".rstrip())
        if ans.result == FIB_NO_NEIGH:  # up the stack, encapsulated, addressed to this NIC
            e.verdict = PASS
            e.count("fib_no_neigh")
            e.output = own_mac + e.output[6:]
            return
        if ans.result != FIB_SENT or (ans.egress != fib.ingress and ans.egress not in fib.tx_ports):
            e.verdict, e.output = DROP, None
            e.count("fib_drop")
            if ans.result == FIB_SENT:
                e.trace.append(f"egress {ans.egress} not in tx_ports")
            return
        e.fib_keep = (index, KeptHop((e.backend, generation), fib.ingress, fib.gen, ans))
    if ans.egress == fib.ingress:
        e.verdict = TX
    else:
        e.verdict = REDIRECT
        e.count("redirect")
    e.output = ans.dmac + ans.smac + e.output[12:]


def _l2(frame: bytes, l3: int, dst: bytes, src: bytes, etype: int) -> bytes:
    if l3 == 14:
        return dst + src + etype.to_bytes(2, "big")
    return dst + src + frame[12:16] + etype.to_bytes(2, "big")  # the tag kept, same TCI


def _hashed_word(prefix_word: bytes, host_bits: int, h: int) -> bytes:
    """The last 32 bits of an outer source: the prefix's network bits, the
    flow hash's bits (as the hash word lies in memory) in the host part."""
    mask = ((1 << host_bits) - 1).to_bytes(4, "big")
    hw = h.to_bytes(4, "little")
    return bytes((p & ~m & 0xFF) | (x & m) for p, m, x in zip(prefix_word, mask, hw))


def _encap(frame: bytes, ip: _Ip, model: LbModel, backend: str, h: int, gue: bool = False) -> tuple[bytes, int]:
    dst = ipaddress.ip_address(backend)
    own_mac = frame[0:6]
    # GUE: a UDP header between the outer IP header and the inner packet; source
    # port 49152 + the hash's low 14 bits, destination gue_port, checksum 0
    udp = struct.pack("!HHHH", 49152 + (h & 0x3FFF), model.gue_port, 8 + ip.ip_len, 0) if gue else b""
    if dst.version == 4:
        net = model.encap_v4
        src = _hashed_word(net.network_address.packed, min(32, 32 - net.prefixlen), h)
        hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, ip.tos, ip.ip_len + 20 + len(udp), 0,
                                    0x4000 if ip.df else 0, OUTER_TTL, UDP if gue else 4, 0, src, dst.packed))
        hdr[10:12] = inet_checksum(bytes(hdr)).to_bytes(2, "big")
        l2 = _l2(frame, ip.l3, model.gw_mac, own_mac, ETH_IP)
    else:
        net = model.encap_v6
        packed = net.network_address.packed
        src = packed[:12] + _hashed_word(packed[12:], min(32, 128 - net.prefixlen), h)
        word0 = (6 << 28) | (ip.tos << 20) | (h & 0xFFFFF)
        nh = UDP if gue else 4 if ip.family == 4 else 41
        hdr = struct.pack("!IHBB16s16s", word0, ip.ip_len + len(udp), nh, OUTER_TTL, src, dst.packed)
        l2 = _l2(frame, ip.l3, model.gw_mac, own_mac, ETH_IPV6)
    hdr = bytes(hdr) + udp
    out = l2 + hdr + frame[ip.l3:]  # the inner packet and any padding after it
    return out, len(l2) + len(hdr)


def _too_big(frame: bytes, ip: _Ip, mtu: int) -> bytes:
    own_mac, peer_mac = frame[0:6], frame[6:12]
    if ip.family == 4:
        ihl = ip.l4 - ip.l3
        quote = frame[ip.l3:ip.l3 + ihl + 8]
        icmp = bytearray(struct.pack("!BBHHH", 3, 4, 0, 0, mtu) + quote)
        icmp[2:4] = inet_checksum(bytes(icmp)).to_bytes(2, "big")
        hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, OUTER_TTL, ICMP, 0,
                                    ip.dst, ip.src))
        hdr[10:12] = inet_checksum(bytes(hdr)).to_bytes(2, "big")
        return _l2(frame, ip.l3, peer_mac, own_mac, ETH_IP) + bytes(hdr) + bytes(icmp)
    quote = frame[ip.l3:ip.l3 + 48]
    icmp = bytearray(struct.pack("!BBHI", 2, 0, 0, max(mtu, IPV6_MIN_MTU)) + quote)
    pseudo = ip.dst + ip.src + struct.pack("!I3xB", len(icmp), ICMPV6)
    icmp[2:4] = inet_checksum(pseudo + bytes(icmp)).to_bytes(2, "big")
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(icmp), ICMPV6, OUTER_TTL, ip.dst, ip.src)
    return _l2(frame, ip.l3, peer_mac, own_mac, ETH_IPV6) + hdr + bytes(icmp)


# --- small constructors ------------------------------------------------------------------------


def _drop(counter: str, *trace: str) -> Expected:
    e = Expected(DROP, trace=list(trace))
    e.count(counter)
    return e


def _pass(frame: bytes, trace: list) -> Expected:
    e = Expected(PASS, trace=list(trace), output=frame)
    e.count("pass")
    return e
