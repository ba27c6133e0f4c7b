"""What an LB node tells the rest of a fleet: which VIPs it announces, and a
digest of each VIP's table so that nodes can be compared.

l4lb never speaks BGP. With `l4lb run --announce [TABLE]` it keeps one host
route (/32, /128, type blackhole, protocol ROUTE_PROTO) per announced VIP
address in a kernel routing table of its own (no rule sends lookups there,
so the routes change nothing in this host's forwarding). A routing daemon on
the node imports that table and exports it to the routers: BIRD 2's kernel
protocol with `learn` (bird_config() writes such a configuration), or FRR's
or GoBGP's equivalent. Routers spread flows over the nodes by ECMP.

A VIP address is announced while all of these hold: the balancer is attached
to the interface, the node is not drained, and at least one VIP on that
address has a backend with effective weight > 0 (weight > 0 and, with a
health check, up or in panic). It is withdrawn as soon as one fails. The
drained flag is saved next to the state file; the routes stay when the
control plane stops or crashes (packets keep arriving and being forwarded:
nothing flaps), and every start reconciles the table to the state.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from . import consts, netlink
from .errors import PersistError, ValidationError

log = logging.getLogger("l4lb.announce")

DEFAULT_TABLE = 4713  # `l4lb run --announce` without a number
ROUTE_PROTO = 76  # rtm_protocol of l4lb's announcement routes (not in iproute2's rt_protos)
RESERVED_TABLES = {0: "unspec", 253: "default", 254: "main", 255: "local"}
RESYNC_SECONDS = 5.0  # the table is also checked this often (program detached, routes removed by hand)


def parse_table(value, what: str = "--announce") -> int:
    text = str(value)
    if not (text.isascii() and text.isdigit() and len(text) <= 10) or not 1 <= int(text) <= 0xFFFFFFFF:
        raise ValidationError(f"{what} {text[:64]!r}: a routing table number from 1 to 4294967295")
    if int(text) in RESERVED_TABLES:
        raise ValidationError(f"{what} {text}: table {RESERVED_TABLES[int(text)]} is the kernel's own; "
                              f"use a table of its own (default {DEFAULT_TABLE})")
    return int(text)


def live_addresses(ctrl) -> set[str]:
    """VIP addresses with at least one VIP that has a backend of effective weight > 0."""
    with ctrl.lock:
        return {v.key.address for v in ctrl.model.vips.values() if any(w > 0 for w in v.effective()[0].values())}


class Announcer:
    """Keeps the announcement table equal to what should be announced. Called
    after every commit (Controller.on_commit), on drain and undrain, and every
    RESYNC_SECONDS."""

    def __init__(self, ctrl, table: int, state_path: Path, attached: Callable[[], bool]):
        self.ctrl = ctrl
        self.table = table
        self.state_path = state_path
        self.attached = attached
        self.lock = threading.Lock()
        self.drained = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        saved = self._read()
        self.drained = bool(saved.get("drained", False))
        old_table = saved.get("table")
        if isinstance(old_table, int) and old_table != table:
            stale = netlink.host_routes(old_table, ROUTE_PROTO)
            netlink.set_host_routes(old_table, ROUTE_PROTO, [], sorted(stale))
            log.info("announce: moved from table %d to %d (removed %d routes there)", old_table, table, len(stale))
        self._save()

    def _read(self) -> dict:
        try:
            doc = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("announce: %s unreadable (%s); starting undrained", self.state_path, e)
            return {}
        return doc if isinstance(doc, dict) else {}

    def _save(self) -> None:
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        try:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, json.dumps({"drained": self.drained, "table": self.table}).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.state_path)
        except OSError as e:
            raise PersistError(f"cannot save the drain state to {self.state_path} ({e.strerror}); "
                               "nothing was changed") from None

    def wanted(self) -> set[str]:
        if self.drained or not self.attached():
            return set()
        return live_addresses(self.ctrl)

    def reconcile(self) -> tuple[list[str], list[str]]:
        """Adds the missing routes and removes the extra ones; returns (added, removed)."""
        with self.lock:
            want = self.wanted()
            have = netlink.host_routes(self.table, ROUTE_PROTO)
            add, remove = sorted(want - have), sorted(have - want)
            if add or remove:
                netlink.set_host_routes(self.table, ROUTE_PROTO, add, remove)
                for a in add:
                    log.info("announce: %s (table %d)", a, self.table)
                for a in remove:
                    log.info("announce: withdrew %s (table %d)", a, self.table)
            return add, remove

    def set_drained(self, drained: bool) -> list[str]:
        """Drain (withdraw every VIP, keep forwarding) or undrain; saved first.
        Returns the addresses announced afterwards."""
        with self.lock:
            old = self.drained
            self.drained = drained
            try:
                self._save()
            except PersistError:
                self.drained = old
                raise
        if old != drained:
            log.info("announce: node %s", "drained: every VIP withdrawn, forwarding goes on" if drained
                     else "undrained")
        self.reconcile()
        return self.announced()

    def announced(self) -> list[str]:
        return sorted(netlink.host_routes(self.table, ROUTE_PROTO), key=_addr_order)

    def start(self) -> None:
        self.reconcile()
        self.ctrl.on_commit.append(self._after_commit)
        self._thread = threading.Thread(target=self._loop, name="l4lb-announce", daemon=True)
        self._thread.start()

    def _after_commit(self) -> None:
        self.reconcile()

    def _loop(self) -> None:
        while not self._stop.wait(RESYNC_SECONDS):
            try:
                self.reconcile()
            except Exception as e:  # noqa: BLE001  the next round tries again
                log.error("announce: %s", e)

    def stop(self, withdraw: bool = False) -> None:
        """Stops following changes. The routes stay (the node keeps serving
        while its control plane is down) unless withdraw (the program is being
        detached)."""
        self._stop.set()
        if self._after_commit in self.ctrl.on_commit:
            self.ctrl.on_commit.remove(self._after_commit)
        if withdraw:
            with self.lock:
                have = netlink.host_routes(self.table, ROUTE_PROTO)
                netlink.set_host_routes(self.table, ROUTE_PROTO, [], sorted(have))
            self.state_path.unlink(missing_ok=True)


def withdraw_saved(state_path: Path) -> int:
    """A node started without --announce after a run with it: the routes that
    run left would go on announcing it. Removes them (and the saved flag);
    returns how many there were."""
    try:
        doc = json.loads(state_path.read_text())
    except FileNotFoundError:
        return 0
    except (OSError, ValueError):
        doc = {}
    table = doc.get("table") if isinstance(doc, dict) else None
    n = 0
    if isinstance(table, int) and table not in RESERVED_TABLES:
        stale = netlink.host_routes(table, ROUTE_PROTO)
        netlink.set_host_routes(table, ROUTE_PROTO, [], sorted(stale))
        n = len(stale)
    state_path.unlink(missing_ok=True)
    return n


def _addr_order(a: str):
    ip = ipaddress.ip_address(a)
    return ip.version, ip


# ---- digests ----------------------------------------------------------------------------

def vip_digests(ctrl) -> list[tuple[object, str, str]]:
    """(VipKey, ring digest, backends digest) of each VIP. The ring digest is
    taken over the active ring as the kernel holds it, each slot named by its
    backend's address (indices differ between nodes, addresses do not); the
    backends digest over the flags and the backends with their weights. Two
    nodes with equal digests send every new flow of that VIP to the same backend."""
    out = []
    with ctrl.lock:
        model, dp = ctrl.model, ctrl.dp
        by_index = {b.index: a for a, b in model.backends.items()}
        lut_size = ctrl.capacity.max_backends + 1
        for key in sorted(model.vips, key=lambda k: (_addr_order(k.address), k.port, k.protocol)):
            v = model.vips[key]
            slots = dp.ring(v.vip_id, v.ring)
            used = [int(i) for i in np.unique(slots) if i]
            named = sorted({by_index.get(i, "?") for i in used})
            ordinal = {a: n for n, a in enumerate(named, 1)}
            lut = np.full(lut_size, 0xFFFFFFFF, dtype=np.uint32)  # an index no backend holds
            lut[0] = 0
            for i in used:
                if i in by_index and i < lut_size:
                    lut[i] = ordinal[by_index[i]]
            ring = hashlib.sha256()
            ring.update(f"{len(slots)}\n{','.join(named)}\n".encode())
            ring.update(lut[np.minimum(slots, lut_size - 1)].astype("<u4").tobytes())
            # the encapsulation only when it is not the default: digests of IP-in-IP VIPs stay
            # what nodes without GUE compute
            extra = [v.encap] if v.encap != consts.DEFAULT_ENCAP else []
            backends = hashlib.sha256(json.dumps(
                [sorted(v.flags), sorted(v.backends.items())] + extra, separators=(",", ":")).encode())
            out.append((key, ring.hexdigest()[:16], backends.hexdigest()[:16]))
    return out


# ---- BIRD 2 configuration for an LB node ----------------------------------------------------

def parse_asn(value, what: str) -> int:
    text = str(value)
    if not (text.isascii() and text.isdigit() and len(text) <= 10) or not 1 <= int(text) <= 0xFFFFFFFF:
        raise ValidationError(f"{what} {text[:64]!r}: an AS number from 1 to 4294967295")
    return int(text)


def _neighbour_address(value: str, what: str) -> str:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise ValidationError(f"{what} {value[:64]!r}: not an IP address") from None
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback or ip.is_link_local:
        raise ValidationError(f"{what} {ip}: give the router's address on the link to this node "
                              "(not unspecified, multicast, loopback or link-local)")
    return str(ip)


def bird_config(router_id: str, local_as, neighbours: list[tuple[str, object]], table: int = DEFAULT_TABLE,
                bfd: bool = True, bfd_interval_ms: int = 100, bfd_multiplier: int = 3,
                hold_time: int = 9, name: str = "l4lb") -> str:
    """A BIRD 2 configuration for an LB node: kernel protocols that learn the
    announcement table (IPv4 and IPv6) and export nothing back to the kernel,
    one eBGP session per neighbour that exports only those routes and imports
    nothing, and BFD on each session (a dead node is noticed in
    bfd_interval_ms * bfd_multiplier, not the hold time)."""
    try:
        rid = ipaddress.IPv4Address(router_id)
    except ValueError:
        raise ValidationError(f"--router-id {str(router_id)[:64]!r}: an IPv4 address "
                              "(usually the node's own address on its first link)") from None
    asn = parse_asn(local_as, "--local-as")
    table = parse_table(table, "--table")
    if not neighbours:
        raise ValidationError("--neighbor: give at least one router (--neighbor ADDRESS AS)")
    if not 10 <= bfd_interval_ms <= 10000:
        raise ValidationError(f"--bfd-interval {bfd_interval_ms}: from 10 to 10000 ms")
    if not 2 <= bfd_multiplier <= 255:
        raise ValidationError(f"--bfd-multiplier {bfd_multiplier}: from 2 to 255")
    if not (hold_time == 0 or 3 <= hold_time <= 65535):
        raise ValidationError(f"--hold-time {hold_time}: 0 or 3 to 65535 seconds")
    peers = []
    seen = set()
    for i, (addr, peer_as) in enumerate(neighbours):
        a = _neighbour_address(str(addr), f"--neighbor[{i}]")
        if a in seen:
            raise ValidationError(f"--neighbor[{i}] {a}: listed twice")
        seen.add(a)
        peers.append((a, parse_asn(peer_as, f"--neighbor[{i}] AS")))
    lines = [
        f"# BIRD 2 configuration of an l4lb node, written by `l4lb bird-config`.",
        f"# `l4lb run --announce {table}` keeps one host route per VIP to announce in",
        f"# kernel table {table}; BIRD learns them and exports them to the routers.",
        f"router id {rid};",
        "",
        "protocol device { scan time 10; }",
        "",
    ]
    for fam in ("ipv4", "ipv6"):
        lines += [
            f"protocol kernel {name}_vips{fam[-1]} {{",
            f"  kernel table {table};",
            "  learn;              # the routes are l4lb's, not BIRD's",
            "  scan time 10;       # changes also arrive at once over netlink",
            f"  {fam} {{ import all; export none; }};",
            "}",
            "",
        ]
    if bfd:
        lines += [
            "protocol bfd {",
            "  interface \"*\" {",
            f"    min rx interval {bfd_interval_ms} ms;",
            f"    min tx interval {bfd_interval_ms} ms;",
            f"    multiplier {bfd_multiplier};",
            "  };",
            "}",
            "",
        ]
    for n, (addr, peer_as) in enumerate(peers, 1):
        fam = "ipv6" if ":" in addr else "ipv4"
        lines += [
            f"protocol bgp {name}_router{n} {{",
            f"  local as {asn};",
            f"  neighbor {addr} as {peer_as};",
            f"  hold time {hold_time};" if hold_time else "  hold time 0;",
            "  connect retry time 1;",
            "  error wait time 1, 10;",
        ]
        if bfd:
            lines.append("  bfd on;")
        lines += [
            f"  {fam} {{",
            "    import none;",
            f"    export where proto = \"{name}_vips{fam[-1]}\";",
            "  };",
            "}",
            "",
        ]
    return "\n".join(lines)
