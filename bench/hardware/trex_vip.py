"""TRex stateless profile: many TCP (or UDP) flows to one l4lb VIP.

    trex-console> start -f /path/to/l4lb/bench/hardware/trex_vip.py -m 1mpps --port 0 \\
                  -t vip=198.18.10.10,port=80,proto=tcp,flows=65536,dst_mac=02:00:00:00:01:01

One stream per profile: a base frame (Ether / IPv4 / TCP or UDP, padded to
`size`) whose source address and source port TRex's field engine draws at
random for every packet, from `src` (default 198.18.0.0/24: .1 to .254) and
from a port range sized so that sources x ports = `flows` distinct 5-tuples;
the IPv4 and L4 checksums are fixed in the NIC (TRex's STLVmFixChecksumHw).
TCP frames carry ACK (`tcp_flags=A`: established flows once each has passed
the LB once) or SYN (`tcp_flags=S`: every packet a new connection, the
LB's most expensive path).

The module imports without TRex: the packet templates are built with scapy
alone (template(), sample_frames() draws frames as the field engine would),
which is how tests/bench/test_hardware.py runs them through the real
balancer. get_streams() needs trex_stl_lib (TRex's, on its PYTHONPATH)."""
from __future__ import annotations

import argparse
import ipaddress
import math
import random

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

try:  # TRex's own library; absent everywhere but on a TRex host
    from trex_stl_lib.api import (CTRexVmInsFixHwCs, STLPktBuilder, STLScVmRaw, STLStream,
                                  STLTXCont, STLVmFixChecksumHw, STLVmFlowVar, STLVmWrFlowVar)
    HAVE_TREX = True
except ImportError:
    HAVE_TREX = False

PORT_LOW = 1024
DEFAULTS = {
    "vip": "198.18.10.10",
    "port": 80,
    "proto": "tcp",
    "tcp_flags": "A",
    "src": "198.18.0.0/24",
    "flows": 65536,
    "size": 64,           # frame bytes with the 4-byte FCS the NIC adds
    "dst_mac": "02:00:00:00:01:01",
    "src_mac": "02:00:00:00:00:0c",
    "pps": 1_000_000,     # per stream; trex-console's -m multiplies it
}


def params(**over) -> dict:
    """DEFAULTS with the given values (strings from TRex's -t converted)."""
    p = dict(DEFAULTS)
    for k, v in over.items():
        if k not in DEFAULTS:
            continue  # TRex passes port_id, direction and others: not ours
        p[k] = type(DEFAULTS[k])(v)
    if p["proto"] not in ("tcp", "udp"):
        raise ValueError(f"proto {p['proto']!r}: tcp or udp")
    if not 1 <= p["port"] <= 65535:
        raise ValueError(f"port {p['port']}: 1-65535")
    if p["flows"] < 1:
        raise ValueError("flows: at least 1")
    return p


def source_range(p: dict) -> tuple[str, str]:
    net = ipaddress.IPv4Network(p["src"])
    if net.num_addresses > 2:
        return str(net.network_address + 1), str(net.broadcast_address - 1)
    return str(net.network_address), str(net.broadcast_address)


def port_range(p: dict) -> tuple[int, int]:
    lo, hi = source_range(p)
    sources = int(ipaddress.IPv4Address(hi)) - int(ipaddress.IPv4Address(lo)) + 1
    ports = min(65536 - PORT_LOW, max(1, math.ceil(p["flows"] / sources)))
    return PORT_LOW, PORT_LOW + ports - 1


def template(p: dict | None = None) -> Ether:
    """The stream's base frame (without FCS), from the first source and port."""
    p = p or params()
    src, _ = source_range(p)
    sport, _ = port_range(p)
    ip = IP(src=src, dst=p["vip"], ttl=64, id=0)
    if p["proto"] == "tcp":
        l4 = TCP(sport=sport, dport=p["port"], flags=p["tcp_flags"], seq=1, ack=1 if "A" in
                 p["tcp_flags"] else 0, window=1024)
    else:
        l4 = UDP(sport=sport, dport=p["port"])
    pkt = Ether(src=p["src_mac"], dst=p["dst_mac"]) / ip / l4
    pad = max(0, p["size"] - 4 - len(pkt))
    return pkt / Raw(b"x" * pad) if pad else pkt


def sample_frames(n: int, seed: int = 1, p: dict | None = None) -> list[bytes]:
    """n frames as the field engine makes them: a random source and source port from the
    profile's ranges, checksums correct (scapy computes what the NIC would)."""
    p = p or params()
    rng = random.Random(seed)
    lo, hi = (int(ipaddress.IPv4Address(a)) for a in source_range(p))
    plo, phi = port_range(p)
    base = template(p)
    out = []
    for _ in range(n):
        pkt = base.copy()
        pkt[IP].src = str(ipaddress.IPv4Address(rng.randint(lo, hi)))
        l4 = pkt[TCP] if p["proto"] == "tcp" else pkt[UDP]
        l4.sport = rng.randint(plo, phi)
        del pkt[IP].chksum
        del l4.chksum
        out.append(bytes(pkt))
    return out


def field_engine(p: dict):
    """TRex's field engine for the profile: random source address and port, checksums."""
    lo, hi = source_range(p)
    plo, phi = port_range(p)
    l4 = "TCP" if p["proto"] == "tcp" else "UDP"
    l4_type = CTRexVmInsFixHwCs.L4_TYPE_TCP if l4 == "TCP" else CTRexVmInsFixHwCs.L4_TYPE_UDP
    return STLScVmRaw([
        STLVmFlowVar(name="src", min_value=lo, max_value=hi, size=4, op="random"),
        STLVmFlowVar(name="sport", min_value=plo, max_value=phi, size=2, op="random"),
        STLVmWrFlowVar(fv_name="src", pkt_offset="IP.src"),
        STLVmWrFlowVar(fv_name="sport", pkt_offset=f"{l4}.sport"),
        STLVmFixChecksumHw(l3_offset="IP", l4_offset=l4, l4_type=l4_type),
    ])


class L4lbVip:
    """The profile TRex loads (register() below)."""

    def get_streams(self, tunables=None, **kwargs):
        """Newer TRex passes `tunables` as a list of '--name value' words (its -t
        arguments), older ones pass them as keyword arguments: both are taken."""
        if not HAVE_TREX:
            raise RuntimeError("trex_stl_lib is not importable: load this profile from TRex "
                               "(trex-console, or with TRex's automation API on PYTHONPATH)")
        over = dict(kwargs)
        if tunables:
            ap = argparse.ArgumentParser(prog="trex_vip.py")
            for k in DEFAULTS:
                ap.add_argument(f"--{k}", dest=k)
            over.update({k: v for k, v in vars(ap.parse_args(list(tunables))).items()
                         if v is not None})
        p = params(**over)
        return [STLStream(packet=STLPktBuilder(pkt=template(p), vm=field_engine(p)),
                          mode=STLTXCont(pps=p["pps"]))]


def register():
    return L4lbVip()
