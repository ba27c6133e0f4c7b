"""The decap program (xdp/decap.c) on a backend without tunnel devices: it
strips the outer header of IP-in-IP packets addressed to one of its tunnel
endpoints, the addresses in its decap_addrs map. load() compiles it with
its endpoints; set_endpoints() changes them. Attaching is Program.attach."""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from . import bpf, consts
from .model import family_of


def _endpoint_key(table, address: str):
    """struct addr_key of address: the address bytes as four raw __be32 words
    (zero-padded for IPv4), and its family."""
    ip = ipaddress.ip_address(address)
    raw = ip.packed + bytes(16 - len(ip.packed))
    key = table.Key()
    for i in range(4):
        key.addr[i] = int.from_bytes(raw[4 * i:4 * (i + 1)], "little")
    key.family = family_of(ip)
    return key


def set_endpoints(prog: bpf.Program, addresses: Iterable[str]) -> None:
    """Makes addresses (IPv4 or IPv6, as text) the program's tunnel endpoints,
    replacing those it had; no addresses: it passes every frame untouched."""
    table = prog.table(consts.MAP_DECAP_ADDRS)
    table.clear()
    for a in addresses:
        table[_endpoint_key(table, a)] = table.Leaf(1)


def load(addresses: Iterable[str] = ()) -> bpf.Program:
    """Compiles and loads the decap program with these tunnel endpoints."""
    prog = bpf.load_decap()
    set_endpoints(prog, addresses)
    return prog
