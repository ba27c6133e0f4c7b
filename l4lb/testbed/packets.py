"""Reading packets by hand: the RFC 1071 checksum (ICMP echo, the kernel
tests' expected packets) and the source address of a captured frame."""
from __future__ import annotations

import ipaddress
import struct


def inet_checksum(data: bytes) -> int:
    """RFC 1071; 0 over a message whose checksum is right."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip_source(frame: bytes) -> str | None:
    """The IP source address of an Ethernet frame (untagged), if it is IP."""
    ethertype = frame[12:14]
    if ethertype == b"\x08\x00" and len(frame) >= 34:
        return str(ipaddress.ip_address(frame[26:30]))
    if ethertype == b"\x86\xdd" and len(frame) >= 54:
        return str(ipaddress.ip_address(frame[22:38]))
    return None
