"""One home for every constant that the C data plane and Python share.

The XDP program never hard-codes these: `cflags()` turns them into -D options
for the compiler, so a limit or flag changed here reaches both sides at once.
Struct layouts are not mirrored here: Python takes them from the compiled
program (bcc's Key/Leaf types)."""
from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

# --- Maglev ------------------------------------------------------------------
DEFAULT_RING_SIZE = 65537  # prime; the Maglev paper's small table
ALLOWED_RING_SIZES = (251, 4099, 65537, 655373)  # small primes keep tests quick
MAGLEV_SEED_OFFSET = 0x4C344C42  # mmh3 seed for a backend's offset
MAGLEV_SEED_SKIP = 0x6D61676C  # mmh3 seed for a backend's skip

# --- flow hash (xdp/hash.h): MurmurHash3 x86_32 over the flow key bytes --------
FLOW_HASH_SEED = 0x9E3779B9

# --- VIP address filter (xdp/hash.h vip_filter_bit) -------------------------------
VIP_FILTER_BITS_LOG2 = 16  # 65536 bits, 8 KiB: one array value
VIP_FILTER_MULT = 0x9E3779B1

# --- capacity defaults (set at compile time, shown by GetStatus) --------------
DEFAULT_MAX_VIPS = 64
DEFAULT_MAX_BACKENDS = 4096  # backend index 0 is reserved: "empty"
DEFAULT_CT_SIZE = 262144  # connection-table entries per family (shared by all CPUs)
# The connection table is an array of buckets of CT_WAYS entries each; a flow
# may live in one of two buckets (xdp/conntrack.h).
CT_WAYS = 4
CT_SLACK = 4  # ways per flow of ct_size: at a quarter full, a flow whose two buckets are both full is rare
CT_SEED2 = 0x2C1B3C6D  # mixes the flow hash into the index of a flow's second bucket
CT_REFRESH_NS = 1_000_000_000  # a TCP entry's last_seen is written at most this often
# A SYN's entry waits in the SYN table (one way per slot, slot = flow hash mod
# CT_SYN_SLOTS) until the flow's next packet moves it into the connection
# table: small enough to stay in the CPU's caches (xdp/conntrack.h).
CT_SYN_SLOTS = 16384

# --- per-VIP flags (vip_meta.flags) -----------------------------------------
VIP_F_NO_SPORT = 1 << 0  # hash without the source port (e.g. QUIC, multi-flow clients)
VIP_F_NO_CONNTRACK = 1 << 1  # Maglev alone: never read or write the connection table
# hash the two addresses alone (no ports, no protocol): a client reaches one
# backend on every VIP of that address with the same backends (FTP, SIP, iperf3)
VIP_F_CLIENT_AFFINITY = 1 << 2
VIP_FLAGS = {"no_source_port": VIP_F_NO_SPORT, "no_conntrack": VIP_F_NO_CONNTRACK,
             "client_affinity": VIP_F_CLIENT_AFFINITY}
# the VIP's encapsulation, a field of its own (`encap`), kept in the same flags word
# so that an established packet learns it from the lookup it makes anyway
VIP_F_GUE = 1 << 3  # GUE (variant 1: the inner IP packet right after a UDP header); clear: IP-in-IP
ENCAPS = {"ipip": 0, "gue": VIP_F_GUE}
DEFAULT_ENCAP = "ipip"

# --- backend flags (backend.flags) ---------------------------------------------
BACKEND_F_VALID = 1 << 0  # slot holds a live backend (0: free or removed)

# --- weights ----------------------------------------------------------------------
MAX_WEIGHT = 65535  # a backend's weight: 0 (drained) to MAX_WEIGHT

# --- where `l4lb run` keeps things ---------------------------------------------------
PIN_ROOT = "/sys/fs/bpf/l4lb"  # maps pinned under PIN_ROOT/<interface>/
STATE_ROOT = "/var/lib/l4lb"  # desired state under STATE_ROOT/<interface>/state.json
LOCK_ROOT = "/run/l4lb"  # LOCK_ROOT/<interface>.lock: held by the one process that owns the interface

# --- health probes (xdp/probe_encap.c, l4lb/probe.py) ------------------------------
# A tunnel probe's socket mark (SO_MARK) names the backend its packets go to:
# PROBE_MARK_TAG in the bits of PROBE_MARK_MASK, the backend index (1..max) in
# the others. The tc egress program encapsulates only packets whose mark
# carries the tag, so marks that other software sets pass untouched.
PROBE_MARK_TAG = 0x4C400000
PROBE_MARK_MASK = 0xFFF00000
PROBE_MARK_GUE = 1 << 19  # the probe leaves in GUE (a probe for a VIP with encap: gue), else IP-in-IP
PROBE_INDEX_MASK = PROBE_MARK_GUE - 1  # up to 512K backends
PROBE_TC_PRIO = 0xC4  # the egress filter's priority and handle, so detach finds exactly ours
PROBE_TC_HANDLE = 0x4C4
DEFAULT_PROBE_INTERVAL_S = 2.0
DEFAULT_PROBE_TIMEOUT_S = 1.0
DEFAULT_PROBE_RISE = 2
DEFAULT_PROBE_FALL = 3

# --- families and protocols ----------------------------------------------------
FAMILY_V4 = 4
FAMILY_V6 = 6
PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}

# --- encapsulation overhead ---------------------------------------------------------
IPV4_HDR = 20
IPV6_HDR = 40
UDP_HDR = 8  # GUE's outer UDP header, on top of the outer IP header

# --- GUE (xdp/encap.h write_gue, xdp/decap.c) ------------------------------------------
DEFAULT_GUE_PORT = 6080  # UDP destination port of GUE packets, node-wide (`gue_port`)
# the source port: GUE_SPORT_BASE | (flow hash & GUE_SPORT_MASK), 49152-65535, so that a
# backend's NIC spreads the flows of one LB over its queues (RSS)
GUE_SPORT_BASE = 0xC000
GUE_SPORT_MASK = 0x3FFF

# --- runtime defaults (config map) ------------------------------------------
DEFAULT_ENCAP_V4 = "198.18.20.0/24"  # outer source prefix of IPv4 tunnels
DEFAULT_ENCAP_V6 = "fd00:198:18:20::/64"  # outer source prefix of IPv6 tunnels
DEFAULT_MTU = 1500
DEFAULT_UDP_TIMEOUT_S = 30
DEFAULT_NEW_FLOW_RATE = 125000  # new connection-table entries per CPU per second; 0 = no limit
DEFAULT_ICMP_RATE = 1000  # generated ICMP messages per CPU per second; 0 = none

# --- next hop of encapsulated packets (lb_config.next_hop, xdp/nexthop.h) -------------
NEXT_HOP_GATEWAY = 0  # the configured gateway MAC, out of the ingress interface (XDP_TX)
NEXT_HOP_FIB = 1  # the kernel's FIB (bpf_fib_lookup): next hop MAC and egress interface
NEXT_HOPS = {"gateway": NEXT_HOP_GATEWAY, "fib": NEXT_HOP_FIB}
MAX_INTERFACES = 16  # interfaces one `l4lb run` attaches to (tx_ports slots)
# a FIB answer is kept per CPU and backend (fib_hops) until user space bumps lb_config.fib_gen
# (a route, rule or neighbour changed: l4lb run follows the kernel's netlink events) or, checked
# every FIB_HOP_USES uses, for FIB_HOP_TTL_NS at most (so that the kernel's changes are followed
# while no control plane runs: after at most 1 s or 64 packets per CPU and backend, the later)
FIB_HOP_TTL_NS = 1_000_000_000
FIB_HOP_USES = 64

# --- map and program names (the registry below lists each map once) ------------
MAP_VIPS = "vips"
MAP_VIP_ADDRS = "vip_addrs"
MAP_RINGS = "rings"
MAP_VIP_INFO = "vip_info"
MAP_VIP_FILTER = "vip_filter"
MAP_BACKENDS = "backends"
MAP_CONNTRACK = "conntrack"  # IPv4 flows
MAP_CONNTRACK6 = "conntrack6"  # IPv6 flows
MAP_CT_SYN = "ct_syn"  # IPv4 flows that sent a SYN and nothing since
MAP_CT_SYN6 = "ct_syn6"  # the same for IPv6
MAP_CT_SYN_USED = "ct_syn_used"  # which SYN slots hold an entry: [0] IPv4, [1] IPv6
MAP_CONFIG = "config"
MAP_VIP_STATS = "vip_stats"
MAP_VIP_FLOWS = "vip_flows"
MAP_BACKEND_STATS = "backend_stats"
MAP_GLOBAL_STATS = "global_stats"
MAP_CPU_STATE = "cpu_state"
MAP_CAPTURE_CFG = "capture_cfg"
MAP_CAPTURE_STATS = "capture_stats"
MAP_CAPTURE_RING = "capture_ring"
MAP_TX_PORTS = "tx_ports"  # devmap: slot -> ifindex (XDP_REDIRECT)
MAP_TX_PORT_SLOTS = "tx_port_slots"  # ifindex -> slot in tx_ports
MAP_FIB_HOPS = "fib_hops"  # backend index -> the FIB's answer, per CPU
MAP_DECAP_ADDRS = "decap_addrs"
MAP_DECAP_STATS = "decap_stats"
MAP_PROBE_STATS = "probe_stats"
PROG_BALANCER = "balancer"
PROG_DECAP = "decap"
PROG_PROBE = "probe_encap"
DECAP_MAX_ADDRS = 64  # tunnel endpoint addresses one decap program knows

# --- live capture (l4lb capture) ------------------------------------------------------
CAPTURE_SNAP_MAX = 1600  # bytes of a frame a copy can hold (an MTU-1500 frame, tag and tunnel header)
CAPTURE_RING_BYTES = 1 << 22  # the ring buffer the copies go through: ~2,500 copies
CAPTURE_VERDICTS = {"drop": 1, "pass": 2, "tx": 3}  # XDP_DROP, XDP_PASS, XDP_TX


def ct_buckets(ct_size: int) -> int:
    """Buckets of a connection table sized for ct_size flows: CT_SLACK ways per flow."""
    return max(2, -(-ct_size * CT_SLACK // CT_WAYS))


@dataclass(frozen=True)
class Capacity:
    """Sizes fixed when the program is compiled."""

    max_vips: int = DEFAULT_MAX_VIPS
    max_backends: int = DEFAULT_MAX_BACKENDS
    ct_size: int = DEFAULT_CT_SIZE
    ring_size: int = DEFAULT_RING_SIZE


# --- the map registry -------------------------------------------------------------
# Every map of the programs in xdp/, once: xdp/maps.h declares each with the
# capacity and flags that cflags() passes from here, the loader pins those
# marked pinned, adoption compares every pinned map with this list, and status
# reports their memory. tests/kernel/test_registry.py holds the compiled
# programs to it.
BPF_F_NO_COMMON_LRU = 1 << 1
BPF_F_RDONLY_PROG = 1 << 7  # the kernel gives every devmap this flag: programs only redirect through it


@dataclass(frozen=True)
class MapSpec:
    name: str
    kind: str  # bpftool's name for the map type: hash, array, lru_hash, percpu_array
    key: str  # C type of the key (xdp/structs.h)
    value: str  # C type of the value
    entries: Callable[[Capacity], int]  # capacity, from the compile-time sizes
    flags: int = 0  # BPF_F_* map flags
    program: str = PROG_BALANCER  # the program in xdp/ that declares it
    pinned: bool = True  # pinned under the interface's directory by `l4lb run`
    users: tuple[str, ...] = ()  # other programs that open it through its pin (never its owner's copy)

    @property
    def macro(self) -> str:
        """The -D names that carry its capacity and flags into xdp/maps.h."""
        return f"MAP_{self.name.upper()}"


MAPS: tuple[MapSpec, ...] = (
    MapSpec(MAP_VIPS, "hash", "struct vip_key", "struct vip_meta", lambda c: c.max_vips),
    MapSpec(MAP_VIP_ADDRS, "hash", "struct addr_key", "__u32", lambda c: c.max_vips),
    MapSpec(MAP_VIP_INFO, "array", "__u32", "struct vip_info", lambda c: c.max_vips),
    MapSpec(MAP_VIP_FILTER, "array", "__u32", "struct vip_filter", lambda c: 1),
    MapSpec(MAP_RINGS, "array", "__u32", "struct ring", lambda c: 2 * c.max_vips),
    MapSpec(MAP_BACKENDS, "array", "__u32", "struct backend", lambda c: c.max_backends + 1,
            users=(PROG_PROBE,)),
    MapSpec(MAP_CONNTRACK, "array", "__u32", "struct ct_bucket4", lambda c: ct_buckets(c.ct_size)),
    MapSpec(MAP_CONNTRACK6, "array", "__u32", "struct ct_bucket6", lambda c: ct_buckets(c.ct_size)),
    MapSpec(MAP_CT_SYN, "array", "__u32", "struct ct_way4", lambda c: CT_SYN_SLOTS),
    MapSpec(MAP_CT_SYN6, "array", "__u32", "struct ct_way6", lambda c: CT_SYN_SLOTS),
    MapSpec(MAP_CT_SYN_USED, "array", "__u32", "struct ct_syn_used", lambda c: 2),
    MapSpec(MAP_CONFIG, "array", "__u32", "struct lb_config", lambda c: 1, users=(PROG_PROBE,)),
    MapSpec(MAP_VIP_STATS, "percpu_array", "__u32", "struct vip_stats", lambda c: c.max_vips),
    MapSpec(MAP_VIP_FLOWS, "percpu_array", "__u32", "struct vip_flows", lambda c: c.max_vips),
    MapSpec(MAP_BACKEND_STATS, "percpu_array", "__u32", "struct backend_stats", lambda c: c.max_backends + 1),
    MapSpec(MAP_GLOBAL_STATS, "percpu_array", "__u32", "struct global_stats", lambda c: 1),
    MapSpec(MAP_CPU_STATE, "percpu_array", "__u32", "struct cpu_state", lambda c: 1),
    MapSpec(MAP_CAPTURE_CFG, "array", "__u32", "struct capture_cfg", lambda c: 1),
    MapSpec(MAP_CAPTURE_STATS, "percpu_array", "__u32", "struct capture_stats", lambda c: 1),
    MapSpec(MAP_CAPTURE_RING, "ringbuf", "", "struct capture_rec", lambda c: CAPTURE_RING_BYTES),
    MapSpec(MAP_TX_PORTS, "devmap", "__u32", "int", lambda c: MAX_INTERFACES, BPF_F_RDONLY_PROG),
    MapSpec(MAP_TX_PORT_SLOTS, "hash", "__u32", "__u32", lambda c: MAX_INTERFACES),
    MapSpec(MAP_FIB_HOPS, "percpu_array", "__u32", "struct fib_hop", lambda c: c.max_backends + 1),
    MapSpec(MAP_DECAP_ADDRS, "hash", "struct addr_key", "__u32", lambda c: DECAP_MAX_ADDRS,
            program=PROG_DECAP, pinned=False),
    MapSpec(MAP_DECAP_STATS, "percpu_array", "__u32", "struct decap_stats", lambda c: 1,
            program=PROG_DECAP, pinned=False),
    MapSpec(MAP_PROBE_STATS, "percpu_array", "__u32", "struct probe_stats", lambda c: 1,
            program=PROG_PROBE, pinned=False),
)
MAP_BY_NAME = {m.name: m for m in MAPS}


def maps_of(program: str) -> tuple[MapSpec, ...]:
    """The maps a program declares: its own, and those it shares through their pins."""
    return tuple(m for m in MAPS if m.program == program or program in m.users)


def cflags(cap: Capacity) -> list[str]:
    """-D options that carry these constants into xdp/*.h."""
    defs = {
        "RING_SIZE": cap.ring_size,
        "MAX_VIPS": cap.max_vips,
        "MAX_BACKENDS": cap.max_backends + 1,  # + the reserved index 0
        "CT_SIZE": cap.ct_size,
        "CT_WAYS": CT_WAYS,
        "CT_SEED2": CT_SEED2,
        "CT_REFRESH_NS": CT_REFRESH_NS,
        "FLOW_HASH_SEED": FLOW_HASH_SEED,
        "VIP_F_NO_SPORT": VIP_F_NO_SPORT,
        "VIP_F_NO_CONNTRACK": VIP_F_NO_CONNTRACK,
        "VIP_F_CLIENT_AFFINITY": VIP_F_CLIENT_AFFINITY,
        "VIP_F_GUE": VIP_F_GUE,
        "GUE_SPORT_BASE": GUE_SPORT_BASE,
        "GUE_SPORT_MASK": GUE_SPORT_MASK,
        "BACKEND_F_VALID": BACKEND_F_VALID,
        "FAMILY_V4": FAMILY_V4,
        "FAMILY_V6": FAMILY_V6,
        "VIP_FILTER_BITS_LOG2": VIP_FILTER_BITS_LOG2,
        "VIP_FILTER_MULT": VIP_FILTER_MULT,
        "PROBE_MARK_TAG": PROBE_MARK_TAG,
        "PROBE_MARK_MASK": PROBE_MARK_MASK,
        "PROBE_MARK_GUE": PROBE_MARK_GUE,
        "PROBE_INDEX_MASK": PROBE_INDEX_MASK,
        "CAPTURE_SNAP_MAX": CAPTURE_SNAP_MAX,
        "NEXT_HOP_GATEWAY": NEXT_HOP_GATEWAY,
        "NEXT_HOP_FIB": NEXT_HOP_FIB,
        "FIB_HOP_USES": FIB_HOP_USES,
    }
    defs_ull = {"FIB_HOP_TTL_NS": FIB_HOP_TTL_NS}
    for m in MAPS:
        defs[f"{m.macro}_ENTRIES"] = m.entries(cap)
        defs[f"{m.macro}_FLAGS"] = m.flags
    return [f"-D{k}={v}u" for k, v in defs.items()] + [f"-D{k}={v}ull" for k, v in defs_ull.items()]
