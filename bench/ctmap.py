"""The connection table seen from the benchmark: count its entries, delete
given flows in a chosen order, empty it -- with the kernel's batch map
operations (a few syscalls for a million entries, where one syscall per
entry would take seconds).

Why the order of deletion matters: a new entry takes the first node of this
CPU's free list, and a deleted entry's node goes back to the front of it.
Deleting a round's flows newest first therefore leaves the free list exactly
as the round found it, so every round of the SYN case inserts into the same
nodes in the same order (an emptied table otherwise hands out its nodes in
hash-bucket order, scattered over memory, and costs far more per insert)."""
from __future__ import annotations

import ctypes
import ipaddress
import socket

import numpy as np
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from l4lb import libbpf
from l4lb.errors import BpfError

from .harness import Vary

def _name(table) -> str:
    name = getattr(table, "name", b"")  # bcc keeps it as bytes, when it keeps it
    return name.decode() if isinstance(name, bytes) else str(name)


def _buckets(table) -> bool:
    """An array of buckets (l4lb.conntrack.CtTable, of any build) rather than a hash map."""
    return hasattr(table, "remove_all")


def count(table) -> int:
    """Entries in the table."""
    if _buckets(table):
        return len(table)
    return libbpf.map_walk(table.map_fd, ctypes.sizeof(table.Key), ctypes.sizeof(table.Leaf), name=_name(table))


def drain(table) -> int:
    """Deletes every entry of the table; returns how many there were."""
    if _buckets(table):
        n = len(table)
        table.clear()
        return n
    return libbpf.map_walk(table.map_fd, ctypes.sizeof(table.Key), ctypes.sizeof(table.Leaf),
                           delete=True, name=_name(table))


def delete_keys(table, keys: bytes) -> int:
    """Deletes the given keys (packed one after another), in that order.
    Returns how many existed; stops at the first that did not (a table of
    buckets: counts every one found)."""
    if _buckets(table):
        return table.remove_all(keys)
    return libbpf.map_delete_batch(table.map_fd, keys, ctypes.sizeof(table.Key), name=_name(table))


def flow_keys(table, frame: bytes, vary: Vary, first: int, n: int,
              newest_first: bool = True) -> bytes:
    """Connection-table keys of the flows the harness makes from `frame` in n
    runs from flow number `first` (vary.numbers(): first, first + stride, ...,
    cycling with vary.wrap; IPv4 or IPv6 TCP/UDP frames), packed in the map's key
    layout (taken from the compiled program)."""
    pkt = Ether(frame)
    if IP in pkt:
        ip, alen, src_in_ip, hdr_len = pkt[IP], 4, 12, pkt[IP].ihl * 4
    elif IPv6 in pkt:
        ip, alen, src_in_ip, hdr_len = pkt[IPv6], 16, 8, 40
    else:
        raise BpfError("flow keys are built for IPv4 or IPv6 TCP/UDP frames only")
    if not (TCP in pkt or UDP in pkt):
        raise BpfError("flow keys are built for TCP/UDP frames only")
    l4 = pkt[TCP] if TCP in pkt else pkt[UDP]
    ip_start = len(frame) - len(bytes(ip))
    src_off = ip_start + src_in_ip
    if vary.sport_off != ip_start + hdr_len or \
            not src_off <= vary.addr_off <= src_off + alen - 2:
        raise BpfError("the harness varies fields this key builder does not know")
    key_t = table.Key
    ksz = ctypes.sizeof(key_t)
    base = bytearray(ksz)
    base[key_t.src.offset:key_t.src.offset + alen] = ipaddress.ip_address(ip.src).packed
    base[key_t.dst.offset:key_t.dst.offset + alen] = ipaddress.ip_address(ip.dst).packed
    base[key_t.dport.offset:key_t.dport.offset + 2] = l4.dport.to_bytes(2, "big")
    base[key_t.proto.offset] = socket.IPPROTO_TCP if TCP in pkt else socket.IPPROTO_UDP
    if hasattr(key_t, "family"):
        base[key_t.family.offset] = 4 if alen == 4 else 6

    flows = vary.numbers(first, n)
    sport = ((l4.sport + (flows & 0xFFFF)) & 0xFFFF).astype(np.uint16)
    a = key_t.src.offset + (vary.addr_off - src_off)
    word = int.from_bytes(frame[vary.addr_off:vary.addr_off + 2], "big")
    addr = ((word + (flows >> 16)) & 0xFFFF).astype(np.uint16)
    keys = np.tile(np.frombuffer(bytes(base), dtype=np.uint8), (n, 1))
    keys[:, key_t.sport.offset] = sport >> 8
    keys[:, key_t.sport.offset + 1] = sport & 0xFF
    keys[:, a] = addr >> 8
    keys[:, a + 1] = addr & 0xFF
    if newest_first:
        keys = keys[::-1]
    return np.ascontiguousarray(keys).tobytes()
