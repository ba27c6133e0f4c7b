"""A VIP's health check as configured, and what health does to its ring.

A check says how to probe each backend (`kind` tcp or http, the `port`,
`interval`, `timeout`, `rise` and `fall` counts, for http the `path`, the
expected status codes and an optional `host`) and by which route (`via`:
`tunnel`, to the VIP itself through the backend's tunnel, or `direct`, to the
backend's own address). A backend that is down takes no new flows, like weight
0 (its connection-table entries stay); but when fewer than `min_healthy`
percent of the VIP's serving backends are up, health is ignored (panic) so a
failing check cannot take the whole service down."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from . import consts
from .errors import ValidationError

KINDS = ("tcp", "http", "none")
ROUTES = ("tunnel", "direct")
KEYS = {"kind", "port", "interval", "timeout", "rise", "fall", "path", "host", "expect", "via", "min_healthy"}


@dataclass(frozen=True)
class HealthCheck:
    kind: str = "tcp"
    port: int = 0  # 0: the VIP's port
    interval: float = consts.DEFAULT_PROBE_INTERVAL_S  # seconds between probes of one backend
    timeout: float = consts.DEFAULT_PROBE_TIMEOUT_S
    rise: int = consts.DEFAULT_PROBE_RISE  # consecutive successes that make a down backend up
    fall: int = consts.DEFAULT_PROBE_FALL  # consecutive failures that make an up backend down
    path: str = "/"
    host: str = ""
    expect: tuple[int, ...] = (200,)
    via: str = "tunnel"
    min_healthy: int = 50  # percent of serving backends below which health is ignored

    def to_dict(self) -> dict:
        """The form parse_health() reads back."""
        d = asdict(self)
        d["expect"] = list(self.expect)
        if not self.port:
            del d["port"]  # the VIP's
        if self.kind != "http":
            for key in ("path", "host", "expect"):
                del d[key]
        elif not self.host:
            del d["host"]
        return d


def _num(doc: dict, key: str, what: str, lo: float, hi: float, integer: bool):
    v = doc[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise ValidationError(f"{what}.{key}: {str(v)[:64]!r} is not a {'whole ' if integer else ''}number")
    if not lo <= v <= hi:
        raise ValidationError(f"{what}.{key}: {v} is out of range ({lo}-{hi})")
    return v


def parse_health(doc, what: str = "health") -> HealthCheck | None:
    """A check from a YAML/JSON mapping; None for `kind: none` or no check."""
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise ValidationError(f"{what}: expected a mapping ({', '.join(sorted(KEYS))})")
    unknown = set(doc) - KEYS
    if unknown:
        raise ValidationError(f"{what}: unknown key(s) {', '.join(sorted(map(str, unknown)))[:200]} "
                              f"(known: {', '.join(sorted(KEYS))})")
    kind = doc.get("kind", "tcp")
    if kind not in KINDS:
        raise ValidationError(f"{what}.kind: {str(kind)[:64]!r} is not one of {', '.join(KINDS)}")
    if kind == "none":
        return None
    out = {"kind": kind}
    if "port" in doc:
        out["port"] = _num(doc, "port", what, 1, 65535, True)
    for key, lo, hi in (("interval", 0.1, 3600), ("timeout", 0.01, 3600)):
        if key in doc:
            out[key] = float(_num(doc, key, what, lo, hi, False))
    for key in ("rise", "fall"):
        if key in doc:
            out[key] = _num(doc, key, what, 1, 100, True)
    if "min_healthy" in doc:
        out["min_healthy"] = _num(doc, "min_healthy", what, 0, 100, True)
    if "via" in doc:
        if doc["via"] not in ROUTES:
            raise ValidationError(f"{what}.via: {str(doc['via'])[:64]!r} is not one of {', '.join(ROUTES)}")
        out["via"] = doc["via"]
    if kind == "http":
        if "path" in doc:
            p = doc["path"]
            if not isinstance(p, str) or not p.startswith("/") or len(p) > 1024 or any(c in p for c in " \r\n"):
                raise ValidationError(f"{what}.path: {str(p)[:64]!r} is not a URL path (e.g. /healthz)")
            out["path"] = p
        if "host" in doc:
            h = doc["host"]
            if not isinstance(h, str) or not h or len(h) > 255 or any(c in h for c in " \r\n/"):
                raise ValidationError(f"{what}.host: {str(h)[:64]!r} is not a host name")
            out["host"] = h
        if "expect" in doc:
            codes = doc["expect"]
            codes = [codes] if isinstance(codes, int) and not isinstance(codes, bool) else codes
            if not isinstance(codes, list) or not codes or not all(
                    isinstance(c, int) and not isinstance(c, bool) and 100 <= c <= 599 for c in codes):
                raise ValidationError(f"{what}.expect: {str(codes)[:64]} is not a list of HTTP status codes (100-599)")
            out["expect"] = tuple(sorted(set(codes)))
    else:
        for key in ("path", "host", "expect"):
            if key in doc:
                raise ValidationError(f"{what}.{key}: only for kind http")
    check = HealthCheck(**out)
    if check.timeout > check.interval:
        raise ValidationError(f"{what}.timeout: {check.timeout} s is longer than the interval ({check.interval} s)")
    return check


@dataclass(frozen=True)
class HealthEvent:
    """A backend's transition as committed (what WatchHealth streams), or, in
    a snapshot, its state when the watch began (old empty, snapshot set)."""

    vip: object  # model.VipKey
    backend: str
    old: str  # "up", "down"; "" in a snapshot
    new: str
    reason: str  # the probe result that made it
    time: float  # unix time of the transition
    panic: bool  # the VIP is in panic after it
    snapshot: bool = False


@dataclass(frozen=True)
class VipGone:
    """Told to the watchers of a VIP that a commit deleted: no transition of
    it will follow, so a watch of that VIP alone ends."""

    vip: object  # model.VipKey


def effective_weights(backends: dict[str, int], down: frozenset[str],
                      check: HealthCheck | None) -> tuple[dict[str, int], bool]:
    """The weights the ring is built from, and whether the VIP is in panic."""
    if check is None or not down:
        return dict(backends), False
    serving = [a for a, w in backends.items() if w > 0]
    up = [a for a in serving if a not in down]
    if serving and len(up) < math.ceil(len(serving) * check.min_healthy / 100):
        return dict(backends), True
    return {a: (0 if a in down else w) for a, w in backends.items()}, False
