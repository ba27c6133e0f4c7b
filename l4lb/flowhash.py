"""The data plane's flow hash and ring-slot choice, in Python (xdp/hash.h).
With l4lb.maglev this predicts the backend the kernel picks for any flow."""
from __future__ import annotations

import ipaddress

import mmh3

from .consts import FLOW_HASH_SEED, VIP_FILTER_BITS_LOG2, VIP_FILTER_MULT


def flow_bytes(src: str, dst: str, sport: int, dport: int, proto: int) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version != d.version:
        raise ValueError(f"flow {src} -> {dst}: mixed address families")
    return s.packed + d.packed + sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + bytes([proto, 0, 0, 0])


def flow_hash(src: str, dst: str, sport: int, dport: int, proto: int) -> int:
    return mmh3.hash(flow_bytes(src, dst, sport, dport, proto), FLOW_HASH_SEED, signed=False)


def vip_flow_hash(src: str, dst: str, sport: int, dport: int, proto: int, flags) -> int:
    """The hash that picks a new flow's backend on a VIP with these flags
    (xdp/hash.h vip_flow_hash): client_affinity hashes the addresses alone,
    no_source_port the flow with source port 0."""
    if "client_affinity" in flags:
        return flow_hash(src, dst, 0, 0, 0)
    return flow_hash(src, dst, 0 if "no_source_port" in flags else sport, dport, proto)


def ring_slot(hash_: int, ring_size: int) -> int:
    """(hash * M) >> 32, as xdp/hash.h computes it."""
    return (hash_ * ring_size) >> 32


def vip_filter_bit(address: str) -> int:
    """The VIP filter bit of an address (xdp/hash.h vip_filter_bit): its 32-bit
    words as loaded from memory (little-endian here), XORed, then multiplied."""
    packed = ipaddress.ip_address(address).packed
    x = 0
    for i in range(0, len(packed), 4):
        x ^= int.from_bytes(packed[i:i + 4], "little")
    return ((x * VIP_FILTER_MULT) & 0xFFFFFFFF) >> (32 - VIP_FILTER_BITS_LOG2)
