"""`l4lb replay`: the real program, loaded but not attached, with maps filled
from a configuration file, run on every packet of a pcap (BPF_PROG_TEST_RUN).
Outputs (TX and PASS frames) go to another pcap; a verdict line per packet
and a summary go to the terminal."""
from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import bpf, consts
from .config import LbConfig, check_capacity
from .dataplane import Dataplane
from .errors import ConfigError
from .state import LbState

LINKTYPE_ETHERNET = 1


@dataclass
class ReplayResult:
    verdicts: Counter = field(default_factory=Counter)
    counters: dict[str, int] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    written: int = 0


def read_pcap(path: Path) -> list[bytes]:
    """Frames of a classic pcap file (either byte order, us or ns), Ethernet only."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    if len(data) < 24:
        raise ConfigError(f"{path}: not a pcap file (only {len(data)} bytes, a pcap header has 24)")
    magic = data[:4]
    endian = {b"\xd4\xc3\xb2\xa1": "<", b"\x4d\x3c\xb2\xa1": "<",
              b"\xa1\xb2\xc3\xd4": ">", b"\xa1\xb2\x3c\x4d": ">"}.get(magic)
    if endian is None:
        hint = " (pcapng is not supported: convert with `editcap -F pcap`)" if magic == b"\x0a\x0d\x0d\x0a" else ""
        raise ConfigError(f"{path}: not a pcap file (magic {magic.hex()}){hint}")
    linktype = struct.unpack(endian + "I", data[20:24])[0] & 0x0FFFFFFF
    if linktype != LINKTYPE_ETHERNET:
        raise ConfigError(f"{path}: link type {linktype}, only Ethernet (1) can be replayed")
    frames, off, n = [], 24, 0
    while off < len(data):
        n += 1
        if off + 16 > len(data):
            raise ConfigError(f"{path}: packet {n}: record header truncated at byte {off}")
        _, _, incl, orig = struct.unpack(endian + "IIII", data[off:off + 16])
        off += 16
        if off + incl > len(data):
            raise ConfigError(f"{path}: packet {n}: {incl} bytes announced, {len(data) - off} left")
        if incl < orig:
            raise ConfigError(f"{path}: packet {n}: captured {incl} of {orig} bytes (snaplen); "
                              "capture whole packets to replay them")
        frames.append(data[off:off + incl])
        off += incl
    return frames


def write_pcap(path: Path, frames: list[bytes]) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_ETHERNET))
        for i, fr in enumerate(frames):
            f.write(struct.pack("<IIII", i, 0, len(fr), len(fr)))
            f.write(fr)


def describe(frame: bytes, gue_port: int = consts.DEFAULT_GUE_PORT) -> str:
    """A short text for a frame: addresses, ports, protocol, encapsulation
    (IP-in-IP, or GUE: UDP to gue_port carrying an IP packet)."""
    from scapy.layers.inet import IP, UDP  # noqa: PLC0415
    from scapy.layers.inet6 import IPv6  # noqa: PLC0415
    from scapy.layers.l2 import Ether  # noqa: PLC0415

    try:
        pkt = Ether(frame)
    except Exception:  # scapy dissects anything; be safe with garbage
        return f"{len(frame)} bytes"
    outer = pkt.payload
    while outer.__class__.__name__ == "Dot1Q":
        outer = outer.payload
    if not isinstance(outer, (IP, IPv6)):
        return f"{pkt.summary()} ({len(frame)} bytes)"
    inner = outer.payload
    if isinstance(inner, (IP, IPv6)):
        kind = {(4, 4): "4in4", (6, 4): "4in6", (6, 6): "6in6"}.get((outer.version, inner.version), "ipip")
        return f"{kind} {outer.src} -> {outer.dst} carrying {_flow(inner)}"
    if isinstance(inner, UDP) and inner.dport == gue_port:
        body = bytes(inner.payload)
        version = body[0] >> 4 if body else 0
        if version in (4, 6):  # GUE variant 1: the version nibble names the inner packet
            packet = (IP if version == 4 else IPv6)(body)
            kind = f"gue {version}in{outer.version}"
            src = f"[{outer.src}]" if outer.version == 6 else outer.src
            dst = f"[{outer.dst}]" if outer.version == 6 else outer.dst
            return f"{kind} {src}:{inner.sport} -> {dst}:{inner.dport} carrying {_flow(packet)}"
    if getattr(outer, "proto", None) == 1 or getattr(outer, "nh", None) == 58:
        return f"icmp {outer.src} -> {outer.dst} {outer.payload.summary()}"
    return _flow(outer)


def _flow(ip) -> str:
    from scapy.layers.inet import TCP, UDP  # noqa: PLC0415

    l4 = ip.payload
    if isinstance(l4, (TCP, UDP)):
        name = "tcp" if isinstance(l4, TCP) else "udp"
        flags = f" [{l4.flags}]" if isinstance(l4, TCP) else ""
        return f"{ip.src}:{l4.sport} -> {ip.dst}:{l4.dport} {name}{flags}"
    return f"{ip.src} -> {ip.dst} proto {getattr(ip, 'proto', getattr(ip, 'nh', '?'))}"


def apply_config(dp: Dataplane, cfg: LbConfig) -> LbState:
    check_capacity(cfg, dp.capacity)
    state = LbState(dp.capacity, dp)
    dp.write_config(cfg.runtime, portless_vips=0)
    for spec in cfg.vips:
        state.add_vip(spec)
    dp.set_portless(state.portless)
    return state


def replay(cfg: LbConfig, pcap_in: Path, pcap_out: Path | None, capacity: consts.Capacity | None = None,
           on_line=print) -> ReplayResult:
    frames = read_pcap(pcap_in)
    cap = capacity or consts.Capacity(max_vips=max(1, len(cfg.vips)), max_backends=max(
        1, len({a for v in cfg.vips for a in v.backends})), ct_size=max(1024, 2 * len(frames)))
    prog = bpf.load_balancer(cap)
    try:
        dp = Dataplane(prog, cap)
        apply_config(dp, cfg)
        res = ReplayResult()
        outputs = []
        for i, frame in enumerate(frames, 1):
            r = prog.run(frame)
            res.verdicts[r.verdict_name] += 1
            if r.verdict_name in ("TX", "PASS"):
                outputs.append(r.data)
            what = describe(frame)
            line = f"#{i:<5} {r.verdict_name:<7} {what}"
            if r.verdict_name == "TX":
                line += f"\n       => {describe(r.data, cfg.runtime.gue_port)}"
            res.lines.append(line)
            on_line(line)
        res.counters = dp.global_stats()
        if pcap_out is not None:
            write_pcap(pcap_out, outputs)
            res.written = len(outputs)
        return res
    finally:
        prog.close()
