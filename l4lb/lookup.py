"""Which backend the live program picks for a flow: a packet built for the
flow runs through the loaded program (BPF_PROG_TEST_RUN). A TCP lookup uses a
RST, which reads the connection table but never writes it; a UDP lookup moves
counters and may create the flow's entry, as the flow's next packet would."""
from __future__ import annotations

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from .bpf import Program
from .model import parse_address, parse_port, parse_protocol
from .errors import ValidationError


def lookup_flow(prog: Program, src: str, dst: str, sport: int, dport: int, protocol: str):
    s, d = parse_address(src, "src"), parse_address(dst, "dst")
    if s.version != d.version:
        raise ValidationError(f"src {s} and dst {d} are of different address families")
    sport, dport = parse_port(sport, "sport"), parse_port(dport, "dport")
    proto = parse_protocol(protocol)
    l3 = IP(src=str(s), dst=str(d)) if s.version == 4 else IPv6(src=str(s), dst=str(d))
    l4 = TCP(sport=sport, dport=dport, flags="R") if proto == "tcp" else UDP(sport=sport, dport=dport)
    pkt = Ether(src="02:00:00:00:00:fe", dst="02:00:00:00:00:fd") / l3 / l4
    r = prog.run(bytes(pkt))
    backend = ""
    if r.verdict_name == "TX":
        out = Ether(r.data).payload
        backend = out.dst
    return r.verdict_name, backend, False
