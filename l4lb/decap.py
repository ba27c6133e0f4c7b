"""The decap program (xdp/decap.c) on a backend without tunnel devices: it
strips the outer header of IP-in-IP packets addressed to one of its tunnel
endpoints, the addresses in its decap_addrs map, and the outer IP and UDP
headers of GUE packets sent to the GUE port. load() compiles it with its
endpoints; set_endpoints() changes them. Attaching is Program.attach."""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from . import bpf, consts
from .model import family_of, parse_gue_port


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


def set_endpoints(prog: bpf.Program, addresses: Iterable[str],
                  gue_port: int | None = consts.DEFAULT_GUE_PORT) -> None:
    """Makes addresses (IPv4 or IPv6, as text) the program's tunnel endpoints,
    replacing those it had; no addresses: it passes every frame untouched.
    gue_port: the UDP port GUE arrives on (the LBs' gue_port); None: IP-in-IP only."""
    port = 0 if gue_port is None else parse_gue_port(gue_port)
    table = prog.table(consts.MAP_DECAP_ADDRS)
    table.clear()
    for a in addresses:
        # the port as a __be16 in the value's low bytes
        table[_endpoint_key(table, a)] = table.Leaf(int.from_bytes(port.to_bytes(2, "big"), "little"))


def load(addresses: Iterable[str] = (), gue_port: int | None = consts.DEFAULT_GUE_PORT) -> bpf.Program:
    """Compiles and loads the decap program with these tunnel endpoints."""
    prog = bpf.load_decap()
    set_endpoints(prog, addresses, gue_port)
    return prog
