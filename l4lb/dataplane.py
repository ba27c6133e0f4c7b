"""Map-level access to a loaded balancer: the writes LbState orders, the
runtime configuration, and counters summed over CPUs. Keys and values are
built from bcc's Key/Leaf types of the compiled program."""
from __future__ import annotations

import ctypes
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from . import consts, timings
from .bpf import Program, percpu_sum, percpu_totals
from .conntrack import CtTable
from .errors import BpfError, CapacityError, StateError
from .model import VipKey, family_of, mac_bytes


@dataclass
class RuntimeConfig:
    gateway_mac: str = "02:00:00:00:00:01"
    encap_v4: ipaddress.IPv4Network = field(default_factory=lambda: ipaddress.IPv4Network(consts.DEFAULT_ENCAP_V4))
    encap_v6: ipaddress.IPv6Network = field(default_factory=lambda: ipaddress.IPv6Network(consts.DEFAULT_ENCAP_V6))
    mtu: int = consts.DEFAULT_MTU
    udp_timeout_s: float = consts.DEFAULT_UDP_TIMEOUT_S
    new_flow_rate: int = consts.DEFAULT_NEW_FLOW_RATE
    icmp_rate: int = consts.DEFAULT_ICMP_RATE
    next_hop: str = "gateway"  # gateway | fib (consts.NEXT_HOPS; README.md "Next hop")
    gue_port: int = consts.DEFAULT_GUE_PORT  # UDP destination port of GUE VIPs' packets


def _words(addr: str) -> list[int]:
    """An address as the four __be32 words of the C structs (raw memory order)."""
    packed = ipaddress.ip_address(addr).packed.ljust(16, b"\0")
    return [int.from_bytes(packed[i:i + 4], "little") for i in range(0, 16, 4)]


def _hostmask_word(net) -> int:
    """The hash bits of the last 32 address bits, as a raw __be32."""
    host_bits = min(32, net.max_prefixlen - net.prefixlen)
    mask = (1 << host_bits) - 1
    return int.from_bytes(mask.to_bytes(4, "big"), "little")


class Dataplane:
    def __init__(self, program: Program, capacity: consts.Capacity):
        self.prog = program
        self.capacity = capacity
        self.t = {m.name: program.table(m.name) for m in consts.maps_of(consts.PROG_BALANCER)}
        self.names = {id(t): name for name, t in self.t.items()}
        self._ct: dict[str, CtTable] = {}
        self.portless = 0
        self.capture = 0  # lb_config.capture: 1 while a capture runs
        self.vip_addresses: dict[str, int] = {}  # address -> VIPs on it

    # ---- configuration ---------------------------------------------------------------
    def write_config(self, cfg: RuntimeConfig, portless_vips: int | None = None) -> None:
        if portless_vips is not None:
            self.portless = portless_vips
        t = self.t[consts.MAP_CONFIG]
        gen = t[t.Key(0)].fib_gen
        v = t.Leaf()
        v.fib_gen = (gen + 1) & 0xFFFFFFFF  # a new configuration: no FIB answer kept from before
        ctypes.memmove(v.gw_mac, mac_bytes(cfg.gateway_mac), 6)
        v.configured = 1
        v.next_hop = consts.NEXT_HOPS[cfg.next_hop]
        v.src4 = _words(str(cfg.encap_v4.network_address))[0]
        v.src4_hostmask = _hostmask_word(cfg.encap_v4)
        for i, w in enumerate(_words(str(cfg.encap_v6.network_address))):
            v.src6[i] = w
        v.src6_hostmask = _hostmask_word(cfg.encap_v6)
        v.mtu = cfg.mtu
        v.new_flow_rate = cfg.new_flow_rate
        v.icmp_rate = cfg.icmp_rate
        v.portless_vips = self.portless
        v.capture = self.capture
        v.udp_timeout_ns = int(cfg.udp_timeout_s * 1e9)
        v.gue_port = int.from_bytes(cfg.gue_port.to_bytes(2, "big"), "little")  # __be16
        self._update(t, t.Key(0), v)

    def bump_fib_gen(self) -> int:
        """A route, rule, address or neighbour changed: the FIB answers kept
        per CPU (fib_hops) are asked again. Returns the new generation."""
        t = self.t[consts.MAP_CONFIG]
        v = t[t.Key(0)]
        v.fib_gen = (v.fib_gen + 1) & 0xFFFFFFFF
        self._update(t, t.Key(0), v)
        return int(v.fib_gen)

    def set_portless(self, n: int) -> None:
        t = self.t[consts.MAP_CONFIG]
        v = t[t.Key(0)]
        v.portless_vips = n
        self.portless = n
        self._update(t, t.Key(0), v)

    # ---- interfaces XDP_REDIRECT may send to (next_hop fib) ---------------------------
    def set_tx_ports(self, ifindexes: list[int]) -> None:
        """Exactly these interfaces (the ones the program is attached to), in
        slots 0.., and nothing else: a slot is written before its ifindex
        points at it, and an ifindex stops pointing at a slot before the slot
        is cleared. Then fib_gen is bumped: an answer kept before names its
        egress by its old slot, which may now hold another interface."""
        if len(ifindexes) > consts.MAX_INTERFACES:
            raise CapacityError(f"{len(ifindexes)} interfaces: at most {consts.MAX_INTERFACES}")
        ports, slots = self.t[consts.MAP_TX_PORTS], self.t[consts.MAP_TX_PORT_SLOTS]
        want = {ifx: i for i, ifx in enumerate(ifindexes)}
        for k in list(slots.keys()):
            if want.get(int(k.value)) != int(slots[k].value):
                del slots[k]
        for ifx, i in want.items():
            self._update(ports, ports.Key(i), ports.Leaf(ifx))
            self._update(slots, slots.Key(ifx), slots.Leaf(i))
        for i in range(len(ifindexes), consts.MAX_INTERFACES):
            try:
                del ports[ports.Key(i)]
            except KeyError:
                pass
        self.bump_fib_gen()

    def tx_ports(self) -> dict[int, int]:
        """{ifindex: slot} as the maps hold it."""
        slots = self.t[consts.MAP_TX_PORT_SLOTS]
        return {int(k.value): int(v.value) for k, v in slots.items()}

    # ---- live capture ---------------------------------------------------------------
    def capture_start(self, vip: int, backend: int, verdicts: int, snaplen: int) -> None:
        """Copies of the packets selected (vip: vip_id + 1 or 0 for any;
        backend: index or 0; verdicts: a bit per XDP_* verdict) go to the
        capture ring until capture_stop()."""
        t = self.t[consts.MAP_CAPTURE_CFG]
        self._update(t, t.Key(0), t.Leaf(vip=vip, backend=backend, verdicts=verdicts, snaplen=snaplen))
        self._set_capture(1)

    def capture_stop(self) -> None:
        self._set_capture(0)

    def _set_capture(self, on: int) -> None:
        t = self.t[consts.MAP_CONFIG]
        v = t[t.Key(0)]
        v.capture = on
        self.capture = on
        self._update(t, t.Key(0), v)

    def capture_counts(self) -> dict[str, int]:
        """copied, lost: summed over CPUs since the maps were made."""
        return percpu_sum(self.t[consts.MAP_CAPTURE_STATS])

    def capture_reader(self, on_record):
        """A reader of the capture ring: on_record(capture_rec) per copy."""
        from .libbpf import RingReader  # noqa: PLC0415

        leaf = self.t[consts.MAP_CAPTURE_RING].Leaf
        size = ctypes.sizeof(leaf)

        def parse(raw: bytes) -> None:
            if len(raw) >= size:
                on_record(leaf.from_buffer_copy(raw[:size]))
        return RingReader(self.t[consts.MAP_CAPTURE_RING].map_fd, parse)

    # ---- Sink (see state.py) -----------------------------------------------------------
    def put_backend(self, index: int, address: str, generation: int, valid: bool,
                    vips: Iterable[int] = ()) -> None:
        """vips: ids of the VIPs that list the backend (a connection-table hit
        is only used for those)."""
        t = self.t[consts.MAP_BACKENDS]
        v = t.Leaf()
        for i, w in enumerate(_words(address)):
            v.addr[i] = w
        v.generation = generation
        v.family = family_of(ipaddress.ip_address(address))
        v.flags = consts.BACKEND_F_VALID if valid else 0
        if valid:
            for vip_id in vips:
                v.vips[vip_id // 64] |= 1 << (vip_id % 64)
        self._update(t, t.Key(index), v)

    def write_ring(self, vip_id: int, copy: int, slots: np.ndarray) -> None:
        t = self.t[consts.MAP_RINGS]
        arr = np.ascontiguousarray(slots, dtype=np.uint32)
        if arr.shape != (self.capacity.ring_size,):
            raise BpfError(f"ring of {arr.shape} entries, program has {self.capacity.ring_size}")
        with timings.timed(timings.RING_PUSH):
            leaf = t.Leaf.from_buffer_copy(arr)  # the whole ring: one copy, one syscall
            self._update(t, t.Key(2 * vip_id + copy), leaf)

    def put_vip(self, key: VipKey, vip_id: int, flags: int, ring: int) -> None:
        t = self.t[consts.MAP_VIPS]
        v = t.Leaf(vip_id=vip_id, flags=flags, ring=ring)
        self._update(t, self.vip_key(key), v)

    def delete_vip(self, key: VipKey) -> None:
        t = self.t[consts.MAP_VIPS]
        try:
            del t[self.vip_key(key)]
        except KeyError:
            pass

    def put_vip_addresses(self, counts: dict[str, int]) -> None:
        """VIPs per address (0: the address carries none any more), then the
        VIP filter, written once for all of them."""
        t = self.t[consts.MAP_VIP_ADDRS]
        for address, count in counts.items():
            k = t.Key()
            for i, w in enumerate(_words(address)):
                k.addr[i] = w
            k.family = family_of(ipaddress.ip_address(address))
            if count:
                self._update(t, k, t.Leaf(count))
                self.vip_addresses[address] = count
            else:
                try:
                    del t[k]
                except KeyError:
                    pass
                self.vip_addresses.pop(address, None)
        self.write_filter(self.vip_addresses)

    def write_filter(self, addresses) -> None:
        """The VIP address filter for these addresses, written whole (one syscall)."""
        from .flowhash import vip_filter_bit  # noqa: PLC0415

        t = self.t[consts.MAP_VIP_FILTER]
        v = t.Leaf()
        for a in addresses:
            bit = vip_filter_bit(a)
            v.bits[bit // 64] |= 1 << (bit % 64)
        self._update(t, t.Key(0), v)

    def put_vip_info(self, vip_id: int, generation: int, flags: int) -> None:
        t = self.t[consts.MAP_VIP_INFO]
        self._update(t, t.Key(vip_id), t.Leaf(generation=generation, flags=flags))

    def clear(self) -> None:
        """Brings every map back to empty: no VIPs, no backends, no flows, zero
        counters (tests, replay and benchmarks reuse one loaded program)."""
        for name in (consts.MAP_VIPS, consts.MAP_VIP_ADDRS):
            self.t[name].clear()
        for family in (consts.FAMILY_V4, consts.FAMILY_V6):
            self.conntrack_table(family).clear()
        backends = self.t[consts.MAP_BACKENDS]
        zero = backends.Leaf()
        for i in range(self.capacity.max_backends + 1):
            backends[backends.Key(i)] = zero
        info = self.t[consts.MAP_VIP_INFO]
        for i in range(self.capacity.max_vips):
            info[info.Key(i)] = info.Leaf()
        self.vip_addresses.clear()
        self.write_filter([])
        if self.capture:
            self.capture_stop()
        for name in (consts.MAP_VIP_STATS, consts.MAP_VIP_FLOWS, consts.MAP_BACKEND_STATS,
                     consts.MAP_GLOBAL_STATS):
            t = self.t[name]
            for i in range(t.max_entries):
                self._zero_percpu(t, i)
        self._zero_percpu(self.t[consts.MAP_CPU_STATE], 0)
        self.bump_fib_gen()
        self._zero_percpu(self.t[consts.MAP_CAPTURE_STATS], 0)

    def clear_vip_stats(self, vip_id: int) -> None:
        self._zero_percpu(self.t[consts.MAP_VIP_STATS], vip_id)
        self._zero_percpu(self.t[consts.MAP_VIP_FLOWS], vip_id)

    def clear_backend_stats(self, index: int) -> None:
        """Before the index is given to another backend (no ring or valid
        connection-table entry names it then, so no packet counts meanwhile)."""
        self._zero_percpu(self.t[consts.MAP_BACKEND_STATS], index)

    def clear_fib_hop(self, index: int) -> None:
        """Before the index is given to another backend: the FIB answers kept
        for the old address (fib_hops, every CPU) are not the new one's."""
        self._zero_percpu(self.t[consts.MAP_FIB_HOPS], index)

    def _zero_percpu(self, t, index: int) -> None:
        values = t[t.Key(index)]
        for i in range(len(values)):
            values[i] = t.sLeaf()
        t[t.Key(index)] = values

    # ---- reads ----------------------------------------------------------------------------
    def read_image(self):
        """What the maps hold, as a state.MapImage (for reconciling on start)."""
        from .state import BackendEntry, MapImage, Ring  # noqa: PLC0415

        img = MapImage()
        names = {n: p for p, n in consts.PROTOCOLS.items()}
        for k, v in self.t[consts.MAP_VIPS].items():
            fam = int(k.family)
            addr = _address(list(k.addr), fam)
            port = int.from_bytes(int(k.port).to_bytes(2, "little"), "big")
            proto = names.get(int(k.proto))
            if proto is None or fam not in (consts.FAMILY_V4, consts.FAMILY_V6):
                raise StateError(f"map {consts.MAP_VIPS!r} holds a key this build cannot read "
                                 f"(protocol {int(k.proto)}, family {fam}); remove the pinned maps to start over")
            img.vips[VipKey(addr, port, proto)] = (int(v.vip_id), int(v.flags), int(v.ring))
        for vid, _, ring in img.vips.values():
            if 0 <= vid < self.capacity.max_vips and ring in (0, 1):
                img.rings[vid] = Ring(None, self.ring(vid, ring))
        info = self.t[consts.MAP_VIP_INFO]
        for vid in range(self.capacity.max_vips):
            v = info[info.Key(vid)]
            if v.generation or v.flags:
                img.vip_info[vid] = (int(v.generation), int(v.flags))
        bt = self.t[consts.MAP_BACKENDS]
        for idx in range(1, self.capacity.max_backends + 1):
            v = bt[bt.Key(idx)]
            if v.flags & consts.BACKEND_F_VALID:
                ids = frozenset(i for i in range(self.capacity.max_vips) if v.vips[i // 64] >> (i % 64) & 1)
                img.backends[idx] = BackendEntry(_address(list(v.addr), int(v.family)), int(v.generation), ids)
        for k, v in self.t[consts.MAP_VIP_ADDRS].items():
            img.addresses[_address(list(k.addr), int(k.family))] = int(v.value)
        self.vip_addresses = dict(img.addresses)
        cfg = self.t[consts.MAP_CONFIG]
        img.portless = int(cfg[cfg.Key(0)].portless_vips)
        self.portless = img.portless
        return img

    def vip_key(self, key: VipKey):
        t = self.t[consts.MAP_VIPS]
        k = t.Key()
        for i, w in enumerate(_words(key.address)):
            k.addr[i] = w
        k.port = int.from_bytes(key.port.to_bytes(2, "big"), "little")
        k.proto = key.proto_number
        k.family = key.family
        return k

    def global_stats(self) -> dict[str, int]:
        return percpu_sum(self.t[consts.MAP_GLOBAL_STATS])

    def vip_stats(self, vip_id: int) -> dict[str, int]:
        return percpu_sum(self.t[consts.MAP_VIP_STATS], vip_id)

    def vip_new_flows(self, vip_id: int) -> int:
        return percpu_sum(self.t[consts.MAP_VIP_FLOWS], vip_id)["new_flows"]

    def backend_stats(self, index: int) -> dict[str, int]:
        """packets, bytes, new_flows of a backend index, summed over CPUs."""
        return percpu_sum(self.t[consts.MAP_BACKEND_STATS], index)

    def counter_tables(self) -> dict[str, tuple]:
        """Every per-VIP and per-backend counter at once, summed over CPUs:
        {map name: (entries x fields array, field names)}, a few syscalls each."""
        return {name: percpu_totals(self.t[name])
                for name in (consts.MAP_VIP_STATS, consts.MAP_VIP_FLOWS, consts.MAP_BACKEND_STATS)}

    def ring(self, vip_id: int, copy: int) -> np.ndarray:
        t = self.t[consts.MAP_RINGS]
        v = t[t.Key(2 * vip_id + copy)]
        return np.frombuffer(bytes(v), dtype=np.uint32).copy()

    def conntrack_table(self, family: int) -> CtTable:
        """The family's connection table as a mapping flow key -> ct_entry."""
        v4 = family == consts.FAMILY_V4
        name = consts.MAP_CONNTRACK if v4 else consts.MAP_CONNTRACK6
        if name not in self._ct:
            self._ct[name] = CtTable(self.t[name], name, self.t[consts.MAP_CT_SYN if v4 else consts.MAP_CT_SYN6])
        return self._ct[name]

    def flows(self, key: VipKey):
        """Connection-table entries of one VIP: (flow key, ct_entry) pairs."""
        t = self.conntrack_table(key.family)
        port = int.from_bytes(key.port.to_bytes(2, "big"), "little")
        if key.family == consts.FAMILY_V4:
            want = _words(key.address)[0]
            match = lambda k: k.dst == want  # noqa: E731
        else:
            want = _words(key.address)
            match = lambda k: list(k.dst) == want  # noqa: E731
        return [(k, v) for k, v in t.items()
                if match(k) and k.proto == key.proto_number and (key.port == 0 or k.dport == port)]

    def delete_flows(self, family: int, keys) -> int:
        t = self.conntrack_table(family)
        n = 0
        for k in keys:
            try:
                del t[k]
                n += 1
            except KeyError:
                pass  # expired or evicted meanwhile
        return n

    def conntrack_size(self) -> int:
        return sum(self.conntrack_entries().values())

    def conntrack_entries(self) -> dict[int, int]:
        """{family: entries in its connection table}, counted with batch
        lookups (a few syscalls for the whole table)."""
        return {family: len(self.conntrack_table(family)) for family in (consts.FAMILY_V4, consts.FAMILY_V6)}

    def _update(self, t, k, v) -> None:
        try:
            t[k] = v
        except Exception as e:  # bcc raises bare Exception
            msg, name = str(e), self.names.get(id(t), "?")
            if "No space" in msg or "E2BIG" in msg or "Argument list too long" in msg:
                raise CapacityError(f"map {name!r} is full: {msg}") from e
            raise BpfError(f"writing map {name!r} failed: {msg}") from e


def _address(words: list[int], family: int) -> str:
    raw = b"".join(int(w).to_bytes(4, "little") for w in words)
    return str(ipaddress.ip_address(raw[:4] if family == consts.FAMILY_V4 else raw))


def flow_key_text(k) -> tuple[str, str, int, int]:
    """(src, dst, sport, dport) of a bcc flow4_key or flow_key."""
    def addr(words):
        words = [words] if isinstance(words, int) else list(words)
        raw = b"".join(int(w).to_bytes(4, "little") for w in words)
        return str(ipaddress.ip_address(raw))
    port = lambda p: int.from_bytes(int(p).to_bytes(2, "little"), "big")  # noqa: E731
    return addr(k.src), addr(k.dst), port(k.sport), port(k.dport)
