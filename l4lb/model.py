"""The objects a load balancer is configured with, and the validation of
every value that comes from outside (gRPC, CLI, config files). Each check
raises ValidationError naming the bad value and what would be accepted."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from . import consts
from .errors import ValidationError, cut, shown

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_LEADING_ZERO_RE = re.compile(r"(^|\.)0[0-9]")
_ADDRESS_HINT = "give e.g. 198.18.10.10 or fd00:198:18:10::10"
_MAX_ADDRESS_CHARS = 45  # the longest IPv6 text: ffff:...:ffff:255.255.255.255
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def parse_address(value, what: str = "address") -> IPAddress:
    """An IP address in one canonical form: any spelling Python's ipaddress
    reads is accepted (upper-case hex, zero groups written out) and stored as
    its canonical text, so one address has one key. Refused: zone indexes
    ('%eth0': two spellings of one map key), IPv4 octets with leading zeros
    (octal to some tools), IPv4-mapped and IPv4-compatible IPv6 (an IPv4 host
    under a second name), and what is never one host: unspecified, multicast,
    broadcast."""
    if isinstance(value, ipaddress.IPv6Address) and value.scope_id:
        value = str(value)
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        addr = value
    elif not isinstance(value, str):
        raise ValidationError(f"{what}: {shown(value)} is not an IP address ({_ADDRESS_HINT})")
    else:
        addr = _parse_address_text(value, what)
    reason = _not_one_host(addr)
    if reason:
        raise ValidationError(f"{what}: {addr} is {reason}")
    return addr


def _parse_address_text(value: str, what: str) -> IPAddress:
    text = value.strip()
    if not text:
        raise ValidationError(f"{what}: empty; {_ADDRESS_HINT}")
    if "%" in text:
        raise ValidationError(f"{what}: {shown(value)} has a zone index ('%...'); "
                              "give the address without one (a zone names no separate address here)")
    if len(text) > _MAX_ADDRESS_CHARS or not text.isascii():
        raise ValidationError(f"{what}: {shown(value)} is not an IP address ({_ADDRESS_HINT})")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        if ":" not in text and _LEADING_ZERO_RE.search(text):
            raise ValidationError(f"{what}: {shown(value)} has an octet with a leading zero, which some tools "
                                  "read as octal; write each octet without leading zeros") from None
        raise ValidationError(f"{what}: {shown(value)} is not an IP address ({_ADDRESS_HINT})") from None


def _not_one_host(addr: IPAddress) -> str:
    if addr.is_unspecified:
        return "the unspecified address; give a unicast address"
    if addr.is_multicast:
        return "multicast; give a unicast address"
    if addr == _BROADCAST:
        return "the broadcast address; give a unicast address"
    if addr.version == 6 and addr.ipv4_mapped:
        return f"an IPv4-mapped IPv6 address; give the IPv4 address {addr.ipv4_mapped} itself"
    if addr.version == 6 and addr.packed[:12] == bytes(12) and not addr.is_loopback:
        return "an IPv4-compatible IPv6 address (deprecated, RFC 4291); give the IPv4 address itself"
    return ""


def check_endpoint(addr: IPAddress, what: str) -> None:
    """A VIP or a backend: an address packets reach across the network, so
    neither loopback nor link-local (valid on one link only, and ambiguous
    without a zone), and one host (parse_address)."""
    reason = _not_one_host(addr)
    if reason:
        raise ValidationError(f"{what}: {addr} is {reason}")
    if addr.is_loopback:
        raise ValidationError(f"{what}: {addr} is a loopback address; give an address reachable over the network")
    if addr.is_link_local:
        raise ValidationError(f"{what}: {addr} is link-local; give a routable address")


def family_of(addr: IPAddress) -> int:
    return consts.FAMILY_V4 if addr.version == 4 else consts.FAMILY_V6


def parse_decimal(text: str, what: str, accepted: str) -> int:
    """A whole number written in ASCII digits. (str.isdigit and int() also
    take other scripts' digits: int('٨٠') is 80.)"""
    t = text.strip() if isinstance(text, str) else ""
    if not (t.isascii() and t.isdigit()):
        raise ValidationError(f"{what}: {shown(text)} is not a whole number in ASCII digits ({accepted})")
    if len(t) > 18:
        raise ValidationError(f"{what}: {shown(text)} is out of range ({accepted})")
    return int(t)


def _port_number(value, what: str, lowest: int, accepted: str) -> int:
    """A port number from lowest to 65535, given as an int or as decimal text."""
    if isinstance(value, str):
        value = parse_decimal(value, what, accepted)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{what}: {shown(value)} is not a port number ({accepted})")
    if not lowest <= value <= 65535:
        raise ValidationError(f"{what}: {shown(value)} is out of range ({accepted})")
    return value


def parse_port(value, what: str = "port") -> int:
    return _port_number(value, what, 0, "0-65535; 0 = every port")


def parse_protocol(value, what: str = "protocol") -> str:
    if isinstance(value, str) and value.lower() in consts.PROTOCOLS:
        return value.lower()
    raise ValidationError(f"{what}: {shown(value)} is not supported (use one of: {', '.join(consts.PROTOCOLS)})")


def parse_weight(value, what: str = "weight") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{what}: {shown(value)} is not an integer weight (0-{consts.MAX_WEIGHT}; 0 drains)")
    if not 0 <= value <= consts.MAX_WEIGHT:
        raise ValidationError(f"{what}: {shown(value)} is out of range (0-{consts.MAX_WEIGHT}; 0 drains)")
    return value


def parse_flags(values, what: str = "flags") -> frozenset[str]:
    if values is None:
        return frozenset()
    if isinstance(values, str) or not isinstance(values, (list, tuple, set, frozenset)):
        raise ValidationError(f"{what}: {shown(values)} is not a list of flags (known: {', '.join(consts.VIP_FLAGS)})")
    out = set()
    for v in values:
        if v not in consts.VIP_FLAGS:
            raise ValidationError(f"{what}: unknown flag {shown(v)} (known: {', '.join(consts.VIP_FLAGS)})")
        out.add(v)
    return frozenset(out)


def flags_to_bits(flags: frozenset[str], encap: str = consts.DEFAULT_ENCAP) -> int:
    """The VIP's word in vip_meta.flags / vip_info.flags: its flags and its encapsulation."""
    bits = consts.ENCAPS[encap]
    for f in flags:
        bits |= consts.VIP_FLAGS[f]
    return bits


def parse_encap(value, what: str = "encap") -> str:
    """A VIP's encapsulation: ipip (default, also for an empty value) or gue."""
    if value is None or value == "":
        return consts.DEFAULT_ENCAP
    if isinstance(value, str) and value.strip().lower() in consts.ENCAPS:
        return value.strip().lower()
    raise ValidationError(f"{what}: {shown(value)} is not an encapsulation (use one of: {', '.join(consts.ENCAPS)})")


def parse_gue_port(value, what: str = "gue_port") -> int:
    """The node-wide GUE destination port: 1-65535 (0 is no UDP port)."""
    return _port_number(value, what, 1, "1-65535; the UDP port the backends decapsulate GUE on")


def parse_mac(value, what: str = "gateway_mac") -> str:
    if not isinstance(value, str) or not _MAC_RE.match(value.strip()):
        raise ValidationError(f"{what}: {shown(value)} is not a MAC address (give six hex pairs, e.g. 02:00:00:00:00:01)")
    mac = value.strip().lower()
    if mac == "00:00:00:00:00:00":
        raise ValidationError(f"{what}: {mac} is no station's MAC; give the gateway's unicast MAC")
    if mac == "ff:ff:ff:ff:ff:ff":
        raise ValidationError(f"{what}: {mac} is the broadcast MAC; give the gateway's unicast MAC")
    if int(mac[:2], 16) & 1:
        raise ValidationError(f"{what}: {mac} is a multicast MAC; give the gateway's unicast MAC")
    return mac


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def check_backend_family(vip: IPAddress, backend: IPAddress, what: str = "backend") -> None:
    """Whether `backend` can serve `vip`: an address reachable over the network
    (check_endpoint), not the VIP itself, of a family the VIP's packets can be
    tunnelled to: an IPv6 VIP cannot be carried to an IPv4 backend; IPv4 VIPs
    go to either (4in4, 4in6)."""
    check_endpoint(backend, what)
    if backend == vip:
        raise ValidationError(f"{what}: {backend} is the VIP itself; give the address of a real server")
    if vip.version == 6 and backend.version == 4:
        raise ValidationError(f"{what}: {backend} is IPv4 but VIP {vip} is IPv6; an IPv6 packet cannot be tunnelled to an IPv4 backend (use an IPv6 backend)")


@dataclass(frozen=True, order=True)
class VipKey:
    address: str  # canonical text form
    port: int
    protocol: str

    @classmethod
    def parse(cls, address, port, protocol, what: str = "vip") -> "VipKey":
        addr = parse_address(address, f"{what}.address")
        check_endpoint(addr, f"{what}.address")
        return cls(str(addr), parse_port(port, f"{what}.port"), parse_protocol(protocol, f"{what}.protocol"))

    @property
    def ip(self) -> IPAddress:
        return ipaddress.ip_address(self.address)

    @property
    def family(self) -> int:
        return family_of(self.ip)

    @property
    def proto_number(self) -> int:
        return consts.PROTOCOLS[self.protocol]

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}/{self.protocol}"


@dataclass
class VipSpec:
    key: VipKey
    flags: frozenset[str] = frozenset()
    backends: dict[str, int] = field(default_factory=dict)  # canonical address -> weight
    encap: str = consts.DEFAULT_ENCAP  # ipip | gue


def parse_backends(vip: VipKey, items, what: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for i, item in enumerate(items):
        w = f"{what}[{i}]"
        if not isinstance(item, dict):
            raise ValidationError(f"{w}: expected {{address: ..., weight: ...}}, got {shown(item)}")
        unknown = set(item) - {"address", "weight"}
        if unknown:
            raise ValidationError(f"{w}: unknown key(s) {cut(', '.join(sorted(map(str, unknown))))} (known: address, weight)")
        if "address" not in item:
            raise ValidationError(f"{w}: missing address")
        addr = parse_address(item["address"], f"{w}.address")
        check_backend_family(vip.ip, addr, f"{w}.address")
        weight = parse_weight(item.get("weight", 1), f"{w}.weight")
        if str(addr) in out:
            raise ValidationError(f"{w}.address: {addr} is listed twice for VIP {vip}")
        out[str(addr)] = weight
    return out
