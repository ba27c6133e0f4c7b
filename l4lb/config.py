"""The YAML configuration that `l4lb replay`, `l4lb run --config` and
`l4lb apply -f` read. Every error names the file, the key path and the bad
value; README.md documents the format."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import consts
from .dataplane import RuntimeConfig
from .errors import ConfigError, ValidationError, shown
from .health import HealthCheck, parse_health
from .model import VipKey, VipSpec, parse_backends, parse_encap, parse_flags, parse_gue_port, parse_mac

TOP_KEYS = {"gateway_mac", "next_hop", "encap_source", "mtu", "udp_timeout", "new_flow_rate", "icmp_rate",
            "gue_port", "vips"}
VIP_KEYS = {"address", "port", "protocol", "flags", "encap", "backends", "health"}
MIN_MTU, MAX_MTU = 1280, 9216


@dataclass
class LbConfig:
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    vips: list[VipSpec] = field(default_factory=list)
    gateway_set: bool = False
    next_hop_set: bool = False  # the file says next_hop
    health: dict[VipKey, HealthCheck | None] = field(default_factory=dict)  # each VIP's check


def _int(value, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{what}: {value!r} is not an integer ({lo}-{hi})")
    if not lo <= value <= hi:
        raise ValidationError(f"{what}: {value} is out of range ({lo}-{hi})")
    return value


def _network(value, version: int, what: str):
    try:
        net = ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise ValidationError(f"{what}: {value!r} is not an IPv{version} prefix (e.g. "
                              f"{consts.DEFAULT_ENCAP_V4 if version == 4 else consts.DEFAULT_ENCAP_V6})") from None
    if net.version != version:
        raise ValidationError(f"{what}: {value} is not an IPv{version} prefix")
    return net


def parse_next_hop(value, what: str) -> str:
    if not isinstance(value, str) or value not in consts.NEXT_HOPS:
        raise ValidationError(f"{what}: {shown(str(value))} is not a next-hop mode "
                              f"(gateway: the gateway MAC; fib: the kernel's routes and neighbours)")
    return value


def parse_config(doc, source: str = "config") -> LbConfig:
    """Validates a parsed YAML document; raises ConfigError('<source>: <path>: ...')."""
    try:
        return _parse(doc)
    except ValidationError as e:
        raise ConfigError(f"{source}: {e}") from None


def _parse(doc) -> LbConfig:
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ValidationError(f"top level: expected a mapping of keys ({', '.join(sorted(TOP_KEYS))}), got {type(doc).__name__}")
    unknown = set(doc) - TOP_KEYS
    if unknown:
        raise ValidationError(f"unknown key(s) {', '.join(sorted(map(str, unknown)))} (known: {', '.join(sorted(TOP_KEYS))})")
    rt = RuntimeConfig()
    cfg = LbConfig(runtime=rt)
    if "gateway_mac" in doc:
        rt.gateway_mac = parse_mac(doc["gateway_mac"], "gateway_mac")
        cfg.gateway_set = True
    if "next_hop" in doc:
        rt.next_hop = parse_next_hop(doc["next_hop"], "next_hop")
        cfg.next_hop_set = True
    if "encap_source" in doc:
        src = doc["encap_source"]
        if not isinstance(src, dict) or set(src) - {"ipv4", "ipv6"}:
            raise ValidationError(f"encap_source: expected {{ipv4: PREFIX, ipv6: PREFIX}}, got {src!r}")
        if "ipv4" in src:
            rt.encap_v4 = _network(src["ipv4"], 4, "encap_source.ipv4")
        if "ipv6" in src:
            rt.encap_v6 = _network(src["ipv6"], 6, "encap_source.ipv6")
    if "mtu" in doc:
        rt.mtu = _int(doc["mtu"], "mtu", MIN_MTU, MAX_MTU)
    if "udp_timeout" in doc:
        rt.udp_timeout_s = _int(doc["udp_timeout"], "udp_timeout", 1, 86400)
    if "new_flow_rate" in doc:
        rt.new_flow_rate = _int(doc["new_flow_rate"], "new_flow_rate", 0, 100_000_000)
    if "icmp_rate" in doc:
        rt.icmp_rate = _int(doc["icmp_rate"], "icmp_rate", 0, 1_000_000)
    if "gue_port" in doc:
        rt.gue_port = parse_gue_port(doc["gue_port"], "gue_port")
    vips = doc.get("vips")
    vips = [] if vips is None else vips
    if not isinstance(vips, list):
        raise ValidationError(f"vips: expected a list, got {type(vips).__name__}")
    seen = set()
    for i, v in enumerate(vips):
        w = f"vips[{i}]"
        if not isinstance(v, dict):
            raise ValidationError(f"{w}: expected a mapping with {', '.join(sorted(VIP_KEYS))}")
        unknown = set(v) - VIP_KEYS
        if unknown:
            raise ValidationError(f"{w}: unknown key(s) {', '.join(sorted(map(str, unknown)))} (known: {', '.join(sorted(VIP_KEYS))})")
        for req in ("address", "protocol"):
            if req not in v:
                raise ValidationError(f"{w}: missing {req}")
        key = VipKey.parse(v["address"], v.get("port", 0), v["protocol"], w)
        if key in seen:
            raise ValidationError(f"{w}: VIP {key} is listed twice")
        seen.add(key)
        backends = v.get("backends")
        backends = [] if backends is None else backends
        if not isinstance(backends, list):
            raise ValidationError(f"{w}.backends: expected a list of {{address, weight}}")
        spec = VipSpec(key, parse_flags(v.get("flags"), f"{w}.flags"),
                       parse_backends(key, backends, f"{w}.backends"),
                       parse_encap(v.get("encap"), f"{w}.encap"))
        cfg.health[key] = parse_health(v.get("health"), f"{w}.health")
        cfg.vips.append(spec)
    return cfg


def load_config(path: str | Path) -> LbConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text file (UTF-8 YAML expected)") from None
    return parse_config_text(text, str(p))


def parse_config_text(text: str, source: str = "config") -> LbConfig:
    """A configuration from YAML text (a file's, or one sent over gRPC)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{source}: {where}not valid YAML: {getattr(e, 'problem', None) or e}") from None
    return parse_config(doc, source)


def check_capacity(cfg: LbConfig, cap: consts.Capacity) -> None:
    if len(cfg.vips) > cap.max_vips:
        raise ConfigError(f"{len(cfg.vips)} VIPs configured, capacity is {cap.max_vips}")
    addrs = {a for v in cfg.vips for a in v.backends}
    if len(addrs) > cap.max_backends:
        raise ConfigError(f"{len(addrs)} distinct backends configured, capacity is {cap.max_backends}")
