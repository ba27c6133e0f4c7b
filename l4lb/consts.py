"""One home for every constant that the C data plane and Python share.

The XDP program never hard-codes these: `cflags()` turns them into -D options
for the compiler, so a limit or flag changed here reaches both sides at once.
Struct layouts are not mirrored here: Python takes them from the compiled
program (bcc's Key/Leaf types)."""
from __future__ import annotations

import socket
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
DEFAULT_CT_SIZE = 262144  # connection-table entries (shared by all CPUs)

# --- per-VIP flags (vip_meta.flags) -----------------------------------------
VIP_F_NO_SPORT = 1 << 0  # hash without the source port (e.g. QUIC, multi-flow clients)
VIP_F_NO_CONNTRACK = 1 << 1  # Maglev alone: never read or write the connection table
VIP_FLAGS = {"no_source_port": VIP_F_NO_SPORT, "no_conntrack": VIP_F_NO_CONNTRACK}

# --- backend flags (backend.flags) ---------------------------------------------
BACKEND_F_VALID = 1 << 0  # slot holds a live backend (0: free or removed)

# --- families and protocols ----------------------------------------------------
FAMILY_V4 = 4
FAMILY_V6 = 6
PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}

# --- encapsulation overhead ---------------------------------------------------------
IPV4_HDR = 20
IPV6_HDR = 40

# --- runtime defaults (config map) ------------------------------------------
DEFAULT_MTU = 1500
DEFAULT_UDP_TIMEOUT_S = 30
DEFAULT_NEW_FLOW_RATE = 125000  # new connection-table entries per CPU per second; 0 = no limit
DEFAULT_ICMP_RATE = 1000  # generated ICMP messages per CPU per second; 0 = none

# --- map names (the C declares them; Python reaches them by these names) ---------
MAP_VIPS = "vips"
MAP_VIP_ADDRS = "vip_addrs"
MAP_RINGS = "rings"
MAP_VIP_INFO = "vip_info"
MAP_VIP_FILTER = "vip_filter"
MAP_BACKENDS = "backends"
MAP_CONNTRACK = "conntrack"  # IPv4 flows
MAP_CONNTRACK6 = "conntrack6"  # IPv6 flows
MAP_CONFIG = "config"
MAP_VIP_STATS = "vip_stats"
MAP_GLOBAL_STATS = "global_stats"
MAP_CPU_STATE = "cpu_state"
MAP_DECAP_ADDRS = "decap_addrs"
MAP_DECAP_STATS = "decap_stats"
PROG_BALANCER = "balancer"
PROG_DECAP = "decap"


@dataclass(frozen=True)
class Capacity:
    """Sizes fixed when the program is compiled."""

    max_vips: int = DEFAULT_MAX_VIPS
    max_backends: int = DEFAULT_MAX_BACKENDS
    ct_size: int = DEFAULT_CT_SIZE
    ring_size: int = DEFAULT_RING_SIZE

    def ring_bytes(self) -> int:
        return 4 * self.ring_size

    def kernel_bytes(self) -> int:
        """Rough kernel memory of the balancer's maps (values and keys, no overhead)."""
        rings = 2 * self.max_vips * self.ring_bytes()
        backends = (self.max_backends + 1) * 24
        vips = self.max_vips * (20 + 16 + 4)
        filt = (1 << VIP_FILTER_BITS_LOG2) // 8
        ct = self.ct_size * (40 + 32 + 64)  # key, value, hash node
        return rings + backends + vips + filt + ct


def cflags(cap: Capacity) -> list[str]:
    """-D options that carry these constants into xdp/*.h."""
    defs = {
        "RING_SIZE": cap.ring_size,
        "MAX_VIPS": cap.max_vips,
        "MAX_BACKENDS": cap.max_backends + 1,  # + the reserved index 0
        "CT_SIZE": cap.ct_size,
        "FLOW_HASH_SEED": FLOW_HASH_SEED,
        "VIP_F_NO_SPORT": VIP_F_NO_SPORT,
        "VIP_F_NO_CONNTRACK": VIP_F_NO_CONNTRACK,
        "BACKEND_F_VALID": BACKEND_F_VALID,
        "FAMILY_V4": FAMILY_V4,
        "FAMILY_V6": FAMILY_V6,
        "VIP_FILTER_BITS_LOG2": VIP_FILTER_BITS_LOG2,
    }
    return [f"-D{k}={v}u" for k, v in defs.items()]
