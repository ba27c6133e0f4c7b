"""A pcapng writer for `l4lb capture`: one Ethernet interface with
nanosecond timestamps, and a comment on every packet saying what the XDP
program did with it (tcpdump -r, Wireshark and scapy read them). The
comment convention:

    l4lb received|sent verdict=tx|pass|drop [vip=198.18.10.10:80/tcp] [backend=198.18.2.1] cpu=N seq=N

A forwarded packet is there twice, as received and as sent (encapsulated);
the sent copy's received copy has seq - 1 on the same cpu."""
from __future__ import annotations

import struct
from typing import BinaryIO

LINKTYPE_ETHERNET = 1
_SHB, _IDB, _EPB = 0x0A0D0D0A, 0x00000001, 0x00000006
_OPT_END, _OPT_COMMENT, _IF_TSRESOL = 0, 1, 9


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + _pad(value)


def _block(kind: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", kind, total) + body + struct.pack("<I", total)


class PcapngWriter:
    def __init__(self, f: BinaryIO, snaplen: int):
        self.f = f
        shb = struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1) + _option(_OPT_END, b"")
        idb = struct.pack("<HHI", LINKTYPE_ETHERNET, 0, snaplen) + _option(_IF_TSRESOL, b"\x09") + \
            _option(_OPT_END, b"")
        f.write(_block(_SHB, shb) + _block(_IDB, idb))

    def write(self, timestamp_ns: int, data: bytes, length: int, comment: str = "") -> None:
        body = struct.pack("<IIIII", 0, timestamp_ns >> 32, timestamp_ns & 0xFFFFFFFF, len(data), length)
        body += _pad(data)
        if comment:
            body += _option(_OPT_COMMENT, comment.encode())
        body += _option(_OPT_END, b"")
        self.f.write(_block(_EPB, body))


def comment(sent: bool, verdict: str, vip: str, backend: str, cpu: int, seq: int) -> str:
    parts = ["l4lb", "sent" if sent else "received", f"verdict={verdict}"]
    if vip:
        parts.append(f"vip={vip}")
    if backend:
        parts.append(f"backend={backend}")
    parts += [f"cpu={cpu}", f"seq={seq}"]
    return " ".join(parts)
