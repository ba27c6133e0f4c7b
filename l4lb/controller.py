"""The load balancer as the control plane drives it: validated changes to
LbState, applied to the maps in a packet-safe order, persisted atomically so
that a restarted control plane recovers everything. One lock serialises
changes; reads take it too, so they never see a half-applied request."""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path

from . import bpf, netlink
from .config import LbConfig
from .dataplane import Dataplane, RuntimeConfig
from .lookup import lookup_flow
from .errors import AlreadyExistsError, NotFoundError, StateError, ValidationError
from .model import (VipKey, VipSpec, check_backend_family, parse_address, parse_flags, parse_mac,
                    parse_weight)
from .state import LbState, state_from_dict, state_to_dict

STATE_VERSION = 1


def parse_backend_map(key: VipKey, items: list[tuple[str, int]], what: str = "backends") -> dict[str, int]:
    out: dict[str, int] = {}
    for i, (addr, weight) in enumerate(items):
        a = parse_address(addr, f"{what}[{i}].address")
        check_backend_family(key.ip, a, f"{what}[{i}].address")
        if str(a) in out:
            raise ValidationError(f"{what}[{i}].address: {a} is listed twice")
        out[str(a)] = parse_weight(weight, f"{what}[{i}].weight")
    return out


class Controller:
    def __init__(self, dp: Dataplane, runtime: RuntimeConfig, state_file: Path | None = None,
                 interface: str = "", attach_mode: str = "none", pin_dir: str | None = None):
        self.dp = dp
        self.capacity = dp.capacity
        self.runtime = runtime
        self.state = LbState(dp.capacity, dp)
        self.state_file = state_file
        self.interface = interface
        self.attach_mode = attach_mode
        self.pin_dir = pin_dir
        self.gateway_ip = ""
        self.source_hash = ""
        self.started = time.monotonic()
        self.lock = threading.RLock()

    # ---- persistence ----------------------------------------------------------------
    def save(self) -> None:
        if not self.state_file:
            return
        rt = asdict(self.runtime)
        rt["encap_v4"], rt["encap_v6"] = str(self.runtime.encap_v4), str(self.runtime.encap_v6)
        doc = {"version": STATE_VERSION, "capacity": asdict(self.capacity), "runtime": rt,
               "gateway_ip": self.gateway_ip, "attach_mode": self.attach_mode,
               "source_hash": self.source_hash, "state": state_to_dict(self.state)}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_file)  # readers see the old file or the new one

    @staticmethod
    def read_saved(state_file: Path) -> dict | None:
        try:
            doc = json.loads(state_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise StateError(f"{state_file}: unreadable state ({e}); move it away to start empty "
                             "(the pinned maps must then be removed too)") from None
        if doc.get("version") != STATE_VERSION:
            raise StateError(f"{state_file}: state version {doc.get('version')}, this l4lb reads {STATE_VERSION}")
        return doc

    def adopt(self, doc: dict) -> None:
        """Takes over the state of a previous process whose maps are pinned."""
        import ipaddress  # noqa: PLC0415

        rt = doc["runtime"]
        rt["encap_v4"] = ipaddress.IPv4Network(rt["encap_v4"])
        rt["encap_v6"] = ipaddress.IPv6Network(rt["encap_v6"])
        self.runtime = RuntimeConfig(**rt)
        self.gateway_ip = doc.get("gateway_ip", "")
        state_from_dict(self.state, doc["state"])
        self.dp.portless = self.state.portless
        for key in self.state.vips:
            self.dp.vip_addresses[key.address] = self.dp.vip_addresses.get(key.address, 0) + 1

    # ---- VIPs --------------------------------------------------------------------------
    def add_vip(self, key: VipKey, flags, backends: list[tuple[str, int]]):
        with self.lock:
            spec = VipSpec(key, parse_flags(list(flags)), parse_backend_map(key, backends))
            vip = self.state.add_vip(spec)
            self.dp.set_portless(self.state.portless)
            self.save()
            return vip

    def delete_vip(self, key: VipKey) -> None:
        with self.lock:
            self.state.delete_vip(key)
            self.dp.set_portless(self.state.portless)
            self.save()

    def get_vip(self, key: VipKey):
        with self.lock:
            return self.state.get(key)

    def list_vips(self):
        with self.lock:
            return sorted(self.state.vips.values(), key=lambda v: v.key)

    def modify_vip(self, key: VipKey, flags):
        with self.lock:
            self.state.set_flags(key, parse_flags(list(flags)))
            self.save()
            return self.state.get(key)

    # ---- backends ------------------------------------------------------------------------
    def add_backends(self, key: VipKey, backends: list[tuple[str, int]]):
        with self.lock:
            vip = self.state.get(key)
            new = parse_backend_map(key, backends)
            if not new:
                raise ValidationError("backends: give at least one backend to add")
            dup = [a for a in new if a in vip.backends]
            if dup:
                raise AlreadyExistsError(f"backend {dup[0]} is already on VIP {key}; use SetBackendWeights to change its weight")
            self.state.set_backends(key, {**vip.backends, **new})
            self.save()
            return vip

    def remove_backends(self, key: VipKey, addresses: list[str]):
        with self.lock:
            vip = self.state.get(key)
            if not addresses:
                raise ValidationError("addresses: give at least one backend to remove")
            gone = []
            for i, a in enumerate(addresses):
                addr = str(parse_address(a, f"addresses[{i}]"))
                if addr not in vip.backends:
                    raise NotFoundError(f"backend {addr} is not on VIP {key}")
                if addr in gone:
                    raise ValidationError(f"addresses[{i}]: {addr} is listed twice")
                gone.append(addr)
            self.state.set_backends(key, {a: w for a, w in vip.backends.items() if a not in gone})
            self.save()
            return vip

    def set_weights(self, key: VipKey, backends: list[tuple[str, int]]):
        with self.lock:
            vip = self.state.get(key)
            new = parse_backend_map(key, backends)
            if not new:
                raise ValidationError("backends: give at least one backend and its weight")
            for a in new:
                if a not in vip.backends:
                    raise NotFoundError(f"backend {a} is not on VIP {key}; add it with AddBackends")
            self.state.set_backends(key, {**vip.backends, **new})
            self.save()
            return vip

    # ---- a whole configuration -----------------------------------------------------------
    def apply(self, cfg: LbConfig) -> list[tuple[str, object]]:
        """Makes the VIPs equal the configuration's; returns the steps taken."""
        with self.lock:
            current = {k: (v.flags, dict(v.backends)) for k, v in self.state.vips.items()}
            steps = plan(current, cfg)
            for kind, obj in steps:
                if kind == "delete":
                    self.delete_vip(obj)
                elif kind == "add":
                    self.add_vip(obj.key, obj.flags, list(obj.backends.items()))
                elif kind == "flags":
                    self.modify_vip(obj.key, obj.flags)
                elif kind == "backends":
                    self.state.set_backends(obj.key, dict(obj.backends))
                    self.save()
            return steps

    # ---- connection table ------------------------------------------------------------------
    def list_flows(self, key: VipKey, limit: int = 1000):
        from .dataplane import flow_key_text  # noqa: PLC0415

        with self.lock:
            self.state.get(key)
            by_index = {b.index: (a, b.generation) for a, b in self.state.backends.items()}
            entries = self.dp.flows(key)
            out = []
            for k, v in entries[:limit]:
                src, dst, sport, dport = flow_key_text(k)
                addr, gen = by_index.get(v.backend, ("", None))
                stale = gen != v.generation
                out.append({"src": src, "dst": dst, "sport": sport, "dport": dport, "protocol": key.protocol,
                            "backend": "" if stale else addr, "stale": stale})
            return out, len(entries)

    def flush_flows(self, key: VipKey) -> int:
        with self.lock:
            self.state.get(key)
            return self.dp.delete_flows(key.family, [k for k, _ in self.dp.flows(key)])

    # ---- gateway, stats, status -----------------------------------------------------------
    def set_gateway(self, mac: str, ip: str = "") -> None:
        with self.lock:
            self.runtime.gateway_mac = parse_mac(mac)
            self.gateway_ip = ip
            self.dp.write_config(self.runtime)
            self.save()

    def set_runtime(self, runtime: RuntimeConfig) -> None:
        with self.lock:
            self.runtime = runtime
            self.dp.write_config(runtime)
            self.save()

    def lookup_flow(self, src: str, dst: str, sport: int, dport: int, protocol: str):
        """(verdict, backend, from connection table) the live program gives a flow."""
        with self.lock:
            return lookup_flow(self.dp.prog, src, dst, sport, dport, protocol)

    def stats(self, key: VipKey | None = None):
        with self.lock:
            vips = [self.state.get(key)] if key else self.list_vips()
            return self.dp.global_stats(), [(v, self.dp.vip_stats(v.vip_id)) for v in vips]

    def counts(self) -> tuple[int, int]:
        """(VIPs, backends)."""
        with self.lock:
            return len(self.state.vips), len(self.state.backends)

    def status(self) -> dict:
        with self.lock:
            out = {"interface": self.interface, "attach_mode": self.attach_mode,
                   "vips": len(self.state.vips), "backends": len(self.state.backends),
                   "uptime": time.monotonic() - self.started,
                   "conntrack_used": self.dp.conntrack_size(), "program_id": 0}
        if self.interface and self.attach_mode != "none":
            now = netlink.xdp_program(self.interface)
            out["program_id"] = now[0] if now else 0
        # the kernel's own figure for pinned maps; the compiled sizes otherwise
        out["kernel_bytes"] = (bpf.maps_memory(self.pin_dir) if self.pin_dir else 0) or bpf.maps_size(self.dp.prog)
        return out


def plan(current: dict, cfg: LbConfig) -> list[tuple[str, object]]:
    """The steps, in order, from the current VIPs ({VipKey: (flags, {addr:
    weight})}) to a configuration's."""
    want = {v.key: v for v in cfg.vips}
    steps: list[tuple[str, object]] = []
    for key in current:
        if key not in want:
            steps.append(("delete", key))
    for key, spec in want.items():
        if key not in current:
            steps.append(("add", spec))
            continue
        flags, backends = current[key]
        if set(flags) != set(spec.flags):
            steps.append(("flags", spec))
        if backends != spec.backends:
            steps.append(("backends", spec))
    return steps
