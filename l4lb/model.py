"""The objects a load balancer is configured with, and the validation of
every value that comes from outside (gRPC, CLI, config files). Each check
raises ValidationError naming the bad value and what would be accepted."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from . import consts
from .errors import ValidationError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def parse_address(value, what: str = "address") -> IPAddress:
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value
    if not isinstance(value, str):
        raise ValidationError(f"{what}: {value!r} is not an IP address (give e.g. 198.18.10.10 or fd00:198:18:10::10)")
    try:
        addr = ipaddress.ip_address(value.strip())
    except ValueError:
        raise ValidationError(f"{what}: {value!r} is not an IP address (give e.g. 198.18.10.10 or fd00:198:18:10::10)") from None
    if addr.is_unspecified or addr.is_multicast:
        raise ValidationError(f"{what}: {value} is {'unspecified' if addr.is_unspecified else 'multicast'}; give a unicast address")
    return addr


def family_of(addr: IPAddress) -> int:
    return consts.FAMILY_V4 if addr.version == 4 else consts.FAMILY_V6


def parse_port(value, what: str = "port") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        else:
            raise ValidationError(f"{what}: {value!r} is not a port number (0-65535; 0 = every port)")
    if not 0 <= value <= 65535:
        raise ValidationError(f"{what}: {value} is out of range (0-65535; 0 = every port)")
    return value


def parse_protocol(value, what: str = "protocol") -> str:
    if isinstance(value, str) and value.lower() in consts.PROTOCOLS:
        return value.lower()
    raise ValidationError(f"{what}: {value!r} is not supported (use one of: {', '.join(consts.PROTOCOLS)})")


def parse_weight(value, what: str = "weight") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{what}: {value!r} is not an integer weight (0-{consts.MAX_WEIGHT}; 0 drains)")
    if not 0 <= value <= consts.MAX_WEIGHT:
        raise ValidationError(f"{what}: {value} is out of range (0-{consts.MAX_WEIGHT}; 0 drains)")
    return value


def parse_flags(values, what: str = "flags") -> frozenset[str]:
    if values is None:
        return frozenset()
    if isinstance(values, str) or not isinstance(values, (list, tuple, set, frozenset)):
        raise ValidationError(f"{what}: {values!r} is not a list of flags (known: {', '.join(consts.VIP_FLAGS)})")
    out = set()
    for v in values:
        if v not in consts.VIP_FLAGS:
            raise ValidationError(f"{what}: unknown flag {v!r} (known: {', '.join(consts.VIP_FLAGS)})")
        out.add(v)
    return frozenset(out)


def flags_to_bits(flags: frozenset[str]) -> int:
    bits = 0
    for f in flags:
        bits |= consts.VIP_FLAGS[f]
    return bits


def parse_mac(value, what: str = "gateway_mac") -> str:
    if not isinstance(value, str) or not _MAC_RE.match(value.strip()):
        raise ValidationError(f"{what}: {value!r} is not a MAC address (give six hex pairs, e.g. 02:00:00:00:00:01)")
    mac = value.strip().lower()
    if int(mac[:2], 16) & 1:
        raise ValidationError(f"{what}: {mac} is a multicast MAC; give the gateway's unicast MAC")
    return mac


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def check_backend_family(vip: IPAddress, backend: IPAddress, what: str = "backend") -> None:
    """An IPv6 VIP cannot be carried to an IPv4 backend; IPv4 VIPs go to either (4in4, 4in6)."""
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


def parse_backends(vip: VipKey, items, what: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for i, item in enumerate(items):
        w = f"{what}[{i}]"
        if not isinstance(item, dict):
            raise ValidationError(f"{w}: expected {{address: ..., weight: ...}}, got {item!r}")
        unknown = set(item) - {"address", "weight"}
        if unknown:
            raise ValidationError(f"{w}: unknown key(s) {', '.join(sorted(unknown))} (known: address, weight)")
        if "address" not in item:
            raise ValidationError(f"{w}: missing address")
        addr = parse_address(item["address"], f"{w}.address")
        check_backend_family(vip.ip, addr, f"{w}.address")
        weight = parse_weight(item.get("weight", 1), f"{w}.weight")
        if str(addr) in out:
            raise ValidationError(f"{w}.address: {addr} is listed twice for VIP {vip}")
        out[str(addr)] = weight
    return out
