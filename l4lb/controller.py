"""The load balancer as the control plane drives it.

A change is computed on a copy of the model and validated whole; the new
desired state is then persisted (write, fsync, rename, fsync the directory)
before any map changes; then the maps are brought to it (state.sync). So a
failed request changes nothing, a failed persist (a full disk) changes
nothing, and a crash at any instruction leaves a file that the next start
reconciles the maps to. Concurrent requests are committed together: one
persist and one map update for all that arrived while the previous commit ran
(each request still succeeds or fails alone)."""
from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path

from . import bpf, faults, netlink
from .config import LbConfig
from .dataplane import Dataplane, RuntimeConfig
from .errors import AlreadyExistsError, L4lbError, NotFoundError, PersistError, StateError, ValidationError
from .health import HealthEvent, VipGone
from .lookup import lookup_flow
from .model import (VipKey, VipSpec, check_backend_family, parse_address, parse_encap, parse_flags,
                    parse_gue_port, parse_mac, parse_weight)
from .state import LbModel, MapImage, sync

STATE_VERSION = 1
log = logging.getLogger("l4lb.controller")


def parse_backend_map(key: VipKey, items: list[tuple[str, int]], what: str = "backends") -> dict[str, int]:
    out: dict[str, int] = {}
    for i, (addr, weight) in enumerate(items):
        a = parse_address(addr, f"{what}[{i}].address")
        check_backend_family(key.ip, a, f"{what}[{i}].address")
        if str(a) in out:
            raise ValidationError(f"{what}[{i}].address: {a} is listed twice")
        out[str(a)] = parse_weight(weight, f"{what}[{i}].weight")
    return out


class _Pending:
    __slots__ = ("change", "result", "error", "done")

    def __init__(self, change):
        self.change = change
        self.result = self.error = None
        self.done = threading.Event()


class Controller:
    def __init__(self, dp: Dataplane, runtime: RuntimeConfig, state_file: Path | None = None,
                 interface: str = "", attach_mode: str = "none", pin_dir: str | None = None):
        self.dp = dp
        self.capacity = dp.capacity
        self.runtime = runtime
        self.model = LbModel(dp.capacity)
        self.applied: MapImage | None = MapImage()  # what the maps hold; None: read them first
        self.state_file = state_file
        self.interface = interface
        self.interfaces: list[str] = [interface] if interface else []  # the program's interfaces, first = interface
        self.attach_mode = attach_mode
        self.attach_modes: dict[str, str] = {}  # interface -> mode, when attached to several
        # raises ValidationError when the node cannot run with this runtime (next_hop fib
        # on an interface that does not forward); set by the node
        self.check_runtime = lambda runtime: None
        self.pin_dir = pin_dir
        self.gateway_ip = ""
        self.source_hash = ""
        self.started = time.monotonic()
        self.lock = threading.RLock()  # held by the committer; reads take it too
        self._queue: list[_Pending] = []
        self._queue_cv = threading.Condition()
        self._committer: threading.Thread | None = None
        self.on_commit: list = []  # called (no arguments, no lock held) after each commit that changed something
        self.health_details = lambda key: {}  # {backend: (last result, latency, since)} from a checker
        # called with each HealthEvent once its commit is done, under self.lock (so a
        # watch's snapshot and its events never overlap or leave a gap): never block
        self._health_listeners: list = []

    @property
    def state(self) -> LbModel:
        return self.model

    # ---- persistence ----------------------------------------------------------------
    def _doc(self, model: LbModel, runtime: RuntimeConfig, gateway_ip: str) -> dict:
        rt = asdict(runtime)
        rt["encap_v4"], rt["encap_v6"] = str(runtime.encap_v4), str(runtime.encap_v6)
        return {"version": STATE_VERSION, "capacity": asdict(self.capacity), "runtime": rt,
                "gateway_ip": gateway_ip, "attach_mode": self.attach_mode,
                "interfaces": self.interfaces, "attach_modes": self.attach_modes,
                "source_hash": self.source_hash, "state": model.to_dict()}

    def _persist(self, doc: dict) -> None:
        """Replaces the state file atomically and durably, or raises PersistError
        with the old file intact."""
        if not self.state_file:
            return
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        try:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            data = json.dumps(doc, separators=(",", ":")).encode()  # compact: the C encoder
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            faults.point("persist.written")
            os.replace(tmp, self.state_file)  # readers see the old file or the new one
            faults.point("persist.renamed")
            dfd = os.open(tmp.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            what = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror
            raise PersistError(f"cannot save the state to {self.state_file} ({what}); nothing was "
                               "changed: free space or fix the state directory, then retry") from None

    def save(self) -> None:
        with self.lock:
            self._persist(self._doc(self.model, self.runtime, self.gateway_ip))

    @staticmethod
    def read_saved(state_file: Path) -> dict | None:
        try:
            doc = json.loads(state_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise StateError(f"{state_file}: unreadable state ({str(e)[:120]}); move it away to start empty "
                             "(the pinned maps must then be removed too)") from None
        if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
            version = doc.get("version") if isinstance(doc, dict) else None
            raise StateError(f"{state_file}: state version {version!r}, this l4lb reads {STATE_VERSION}")
        for k in ("capacity", "runtime", "state"):
            if not isinstance(doc.get(k), dict):
                raise StateError(f"{state_file}: the saved state has no {k!r} section; move it away to start empty")
        return doc

    @staticmethod
    def runtime_of(doc: dict) -> RuntimeConfig:
        """The runtime section of a saved state."""
        try:
            rt = dict(doc["runtime"])
            rt["encap_v4"] = ipaddress.IPv4Network(rt["encap_v4"])
            rt["encap_v6"] = ipaddress.IPv6Network(rt["encap_v6"])
            runtime = RuntimeConfig(**rt)
            runtime.gateway_mac = parse_mac(runtime.gateway_mac, "saved gateway_mac")
            if runtime.next_hop not in ("gateway", "fib"):
                raise ValueError(f"next_hop {runtime.next_hop!r}")
            runtime.gue_port = parse_gue_port(runtime.gue_port, "saved gue_port")
        except (KeyError, TypeError, ValueError) as e:
            raise StateError(f"saved state: the runtime section is malformed ({str(e)[:120]})") from None
        return runtime

    def adopt(self, doc: dict) -> None:
        """Takes over a saved state (with the maps of a previous process, or
        fresh ones after a reboot) and reconciles the maps to it."""
        runtime = self.runtime_of(doc)
        model = LbModel.from_dict(self.capacity, doc["state"])
        with self.lock:
            self.runtime, self.model = runtime, model
            self.gateway_ip = str(doc.get("gateway_ip", ""))
            self.applied = None
            self.reconcile()

    def reconcile(self) -> None:
        """Brings the maps to the model, whatever they hold now."""
        with self.lock:
            have = self.dp.read_image()
            if self.model.resolve(have):  # a live ring copy holds another table: use the idle one
                self.save()
            self.dp.write_config(self.runtime, portless_vips=have.portless)
            self._sync(have)

    def _sync(self, have: MapImage | None = None) -> None:
        if have is None and self.applied is None:  # an earlier write failed half-way
            have = self.dp.read_image()
            if self.model.resolve(have):
                self.save()
        have = have if have is not None else self.applied
        want = self.model.image()
        self.applied = None  # unknown until the writes are done
        try:
            sync(have, want, self.dp, self.capacity, step=faults.point)
        except L4lbError as e:
            log.error("writing the maps failed (%s); the saved state is kept and the maps are "
                      "reconciled on the next change or start", e)
            raise
        self.model.reserve()
        self.applied = want

    # ---- commits --------------------------------------------------------------------------
    def _commit(self, change):
        """Runs change(model, ctx) on a copy; commits it with whatever else is
        waiting. Returns what change returned, or raises its error."""
        me = _Pending(change)
        with self._queue_cv:
            self._queue.append(me)
            if self._committer is None:
                self._committer = threading.Thread(target=self._commit_loop, name="l4lb-commit", daemon=True)
                self._committer.start()
            self._queue_cv.notify()
        me.done.wait()
        if me.error is not None:
            raise me.error
        return me.result

    def _commit_loop(self) -> None:
        """One thread commits: every request that arrived while it was busy
        goes into its next commit."""
        while True:
            with self._queue_cv:
                while not self._queue:
                    self._queue_cv.wait()
                batch, self._queue = self._queue, []
            try:
                with self.lock:
                    self._run(batch)
            except BaseException as e:  # never leave a caller waiting
                for p in batch:
                    if p.error is None:
                        p.error = e if isinstance(e, L4lbError) else StateError(f"commit failed: {e}")
            for p in batch:
                p.done.set()
            if any(p.error is None for p in batch):
                for fn in list(self.on_commit):
                    try:
                        fn()
                    except Exception as e:  # a listener's failure is not the request's
                        log.error("after a commit: %s", e)

    def _run(self, batch: list[_Pending]) -> None:
        # One copy for the whole batch. A change that fails may have changed
        # the copy half-way: the copy is then made again from the committed
        # model with the changes that succeeded (failures are the rare case).
        def fresh():
            return self.model.clone(), {"runtime": self.runtime, "gateway_ip": self.gateway_ip}

        work, ctx = fresh()
        ok: list[_Pending] = []
        for p in batch:
            try:
                p.result = p.change(work, ctx)
            except L4lbError as e:
                p.error = e
                work, ctx = fresh()
                for q in ok:
                    q.result = q.change(work, ctx)
                continue
            ok.append(p)
        try:
            if ok:
                work.flip_changed(self.model)
                self._persist(self._doc(work, ctx["runtime"], ctx["gateway_ip"]))
                ctx.setdefault("health_events", []).extend(
                    VipGone(k) for k in sorted(self.model.vips.keys() - work.vips.keys()))
                runtime_changed = ctx["runtime"] is not self.runtime
                self.model, self.runtime, self.gateway_ip = work, ctx["runtime"], ctx["gateway_ip"]
                if runtime_changed:
                    self.dp.write_config(self.runtime)
                self._sync()
        except L4lbError as e:
            for p in ok:
                p.error = e
            return
        for event in ctx.get("health_events", ()):
            for fn in list(self._health_listeners):
                try:
                    fn(event)
                except Exception as e:  # noqa: BLE001  a watcher's failure is not the commit's
                    log.error("health watcher: %s", e)

    # ---- VIPs --------------------------------------------------------------------------
    def add_vip(self, key: VipKey, flags, backends: list[tuple[str, int]], encap: str = ""):
        spec = VipSpec(key, parse_flags(list(flags)), parse_backend_map(key, backends), parse_encap(encap))
        return self._commit(lambda m, _: m.add_vip(spec).clone())

    def delete_vip(self, key: VipKey) -> None:
        self._commit(lambda m, _: m.delete_vip(key))

    def get_vip(self, key: VipKey):
        with self.lock:
            return self.model.get(key).clone()

    def list_vips(self):
        with self.lock:
            return sorted((v.clone() for v in self.model.vips.values()), key=lambda v: v.key)

    def modify_vip(self, key: VipKey, flags, encap: str = ""):
        """The VIP's complete new set of flags; its encapsulation too, unless encap is empty."""
        flags = parse_flags(list(flags))
        encap = parse_encap(encap) if encap else ""

        def change(m, _):
            m.set_flags(key, flags)
            if encap:
                m.set_encap(key, encap)
            return m.get(key).clone()
        return self._commit(change)

    # ---- health ------------------------------------------------------------------------------
    def set_health_check(self, key: VipKey, check) -> object:
        """A VIP's health check (None: no check, every backend counts as up)."""
        def change(m, _):
            m.set_health_check(key, check)
            return m.get(key).clone()
        return self._commit(change)

    def report_health(self, key: VipKey, address: str, up: bool, reason: str = "",
                      at: float | None = None) -> None:
        """A prober's verdict at unix time `at`: a backend went up or down.
        Logged on one line; a VIP entering or leaving panic is logged too;
        health watchers get the event."""
        at = time.time() if at is None else at

        def change(m, ctx):
            vip = m.get(key)
            was_down, was_panic = address in vip.down, vip.effective()[1]
            m.set_backend_health(key, address, up)
            panic = m.get(key).effective()[1]
            if was_down == up:
                ctx.setdefault("health_events", []).append(HealthEvent(
                    key, address, "down" if was_down else "up", "up" if up else "down", reason, at, panic))
            return was_down, was_panic, panic
        try:
            was_down, was_panic, panic = self._commit(change)
        except NotFoundError:
            return  # the VIP or backend went away while the probe ran
        if was_down == up:
            log.info("health: VIP %s backend %s %s -> %s (%s)", key, address,
                     "down" if was_down else "up", "up" if up else "down", reason or "probe")
        if panic != was_panic:
            log.warning("health: VIP %s %s panic: %s", key, "enters" if panic else "leaves",
                        "too few backends are up, every backend serves" if panic else "enough backends are up")

    def watch_health(self, key: VipKey | None, listener, snapshot: bool = False) -> list[HealthEvent]:
        """Registers listener(HealthEvent) for every transition from now on
        (of VIP key, or of every VIP). Returns the snapshot (each backend of
        each checked VIP as it stands) when asked: taken under the lock that
        transitions are delivered under, so that none is missed or repeated.
        NotFoundError for a VIP that does not exist."""
        with self.lock:
            vips = [self.model.get(key)] if key else list(self.model.vips.values())
            first = []
            for v in vips if snapshot else ():
                if v.health is None:
                    continue
                panic = v.effective()[1]
                details = self.health_details(v.key)
                for a in sorted(v.backends):
                    reason, _latency, since = details.get(a, ("", 0.0, 0.0))
                    first.append(HealthEvent(v.key, a, "", "down" if a in v.down else "up", reason, since,
                                             panic, snapshot=True))
            if key is None:
                self._health_listeners.append(listener)
            else:
                self._health_listeners.append(_only(key, listener))
            return first

    def unwatch_health(self, listener) -> None:
        with self.lock:
            self._health_listeners = [fn for fn in self._health_listeners
                                      if fn is not listener and getattr(fn, "listener", None) is not listener]

    # ---- backends ------------------------------------------------------------------------
    def add_backends(self, key: VipKey, backends: list[tuple[str, int]]):
        new = parse_backend_map(key, backends)
        if not new:
            raise ValidationError("backends: give at least one backend to add")

        def change(m, _):
            vip = m.get(key)
            dup = [a for a in new if a in vip.backends]
            if dup:
                raise AlreadyExistsError(f"backend {dup[0]} is already on VIP {key}; "
                                         "use SetBackendWeights to change its weight")
            m.set_backends(key, {**vip.backends, **new})
            return m.get(key).clone()
        return self._commit(change)

    def remove_backends(self, key: VipKey, addresses: list[str]):
        if not addresses:
            raise ValidationError("addresses: give at least one backend to remove")
        gone: list[str] = []
        for i, a in enumerate(addresses):
            addr = str(parse_address(a, f"addresses[{i}]"))
            if addr in gone:
                raise ValidationError(f"addresses[{i}]: {addr} is listed twice")
            gone.append(addr)

        def change(m, _):
            vip = m.get(key)
            for addr in gone:
                if addr not in vip.backends:
                    raise NotFoundError(f"backend {addr} is not on VIP {key}")
            m.set_backends(key, {a: w for a, w in vip.backends.items() if a not in gone})
            return m.get(key).clone()
        return self._commit(change)

    def set_weights(self, key: VipKey, backends: list[tuple[str, int]]):
        new = parse_backend_map(key, backends)
        if not new:
            raise ValidationError("backends: give at least one backend and its weight")

        def change(m, _):
            vip = m.get(key)
            for a in new:
                if a not in vip.backends:
                    raise NotFoundError(f"backend {a} is not on VIP {key}; add it with AddBackends")
            m.set_backends(key, {**vip.backends, **new})
            return m.get(key).clone()
        return self._commit(change)

    # ---- a whole configuration -----------------------------------------------------------
    def apply(self, cfg: LbConfig, runtime: bool = False, dry_run: bool = False) -> list[tuple[str, object]]:
        """Makes the VIPs (and with runtime=True the runtime settings: the
        gateway when the file sets one, encapsulation sources, MTU, timeouts,
        rates) equal the configuration's, as one change: all of it, or nothing.
        Returns the steps; dry_run computes and validates them, changing nothing."""
        def change(m, ctx):
            current = {k: (v.flags, dict(v.backends), v.encap) for k, v in m.vips.items()}
            steps = plan(current, cfg)
            for kind, obj in steps:
                if kind == "delete":
                    m.delete_vip(obj)
                elif kind == "add":
                    m.add_vip(obj)
                elif kind == "flags":
                    m.set_flags(obj.key, obj.flags)
                elif kind == "encap":
                    m.set_encap(obj.key, obj.encap)
                elif kind == "backends":
                    m.set_backends(obj.key, dict(obj.backends))
            for spec in cfg.vips:
                check = cfg.health.get(spec.key)
                if m.get(spec.key).health != check:
                    m.set_health_check(spec.key, check)
                    steps.append(("health", spec))
            if runtime and asdict(cfg.runtime) != asdict(ctx["runtime"]):
                new_rt = RuntimeConfig(**asdict(cfg.runtime))
                if not cfg.gateway_set:
                    new_rt.gateway_mac = ctx["runtime"].gateway_mac
                if not cfg.next_hop_set:  # a node-level setting, as `l4lb run --next-hop` made it
                    new_rt.next_hop = ctx["runtime"].next_hop
                old, new = asdict(ctx["runtime"]), asdict(new_rt)
                changed = [k for k in new if new[k] != old[k]]
                if "next_hop" in changed:
                    self.check_runtime(new_rt)
                if changed:
                    ctx["runtime"] = new_rt
                    steps.append(("runtime", changed))
            return steps
        if dry_run:
            with self.lock:
                return change(self.model.clone(), {"runtime": self.runtime, "gateway_ip": self.gateway_ip})
        return self._commit(change)

    # ---- connection table ------------------------------------------------------------------
    def list_flows(self, key: VipKey, limit: int = 1000):
        from .dataplane import flow_key_text  # noqa: PLC0415

        with self.lock:
            self.model.get(key)
            by_index = {b.index: (a, b.generation) for a, b in self.model.backends.items()}
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
            self.model.get(key)
            return self.dp.delete_flows(key.family, [k for k, _ in self.dp.flows(key)])

    # ---- gateway, runtime, stats, status -----------------------------------------------------
    def set_gateway(self, mac: str, ip: str = "") -> None:
        mac = parse_mac(mac)

        def change(_m, ctx):
            rt = RuntimeConfig(**asdict(ctx["runtime"]))
            rt.gateway_mac = mac
            ctx["runtime"], ctx["gateway_ip"] = rt, ip
        self._commit(change)

    def set_runtime(self, runtime: RuntimeConfig) -> None:
        def change(_m, ctx):
            if runtime.next_hop != ctx["runtime"].next_hop:
                self.check_runtime(runtime)
            ctx["runtime"] = RuntimeConfig(**asdict(runtime))
        self._commit(change)

    def lookup_flow(self, src: str, dst: str, sport: int, dport: int, protocol: str):
        """(verdict, backend, from connection table) the live program gives a flow."""
        with self.lock:
            return lookup_flow(self.dp.prog, src, dst, sport, dport, protocol)

    def vip_of_flow(self, dst: str, dport: int, protocol: str):
        """The VIP a flow to dst:dport/protocol belongs to (the exact port
        first, then the address's port-less VIP), and what its backend is
        picked by; (None, "") for no VIP."""
        for port in (dport, 0):
            try:
                key = VipKey.parse(dst, port, protocol)
            except L4lbError:
                return None, ""
            with self.lock:
                vip = self.model.vips.get(key)
            if vip is not None:
                if "client_affinity" in vip.flags:
                    return key, "client address (client_affinity)"
                if "no_source_port" in vip.flags:
                    return key, "addresses, destination port, protocol (no_source_port)"
                return key, "addresses, ports, protocol"
        return None, ""

    def stats(self, key: VipKey | None = None):
        """(global counters, [(VIP, its counters)]): a VIP's counters are
        packets, bytes, new_flows and backends ({address: packets, bytes,
        new_flows}), all summed over CPUs."""
        snap = self.snapshot(key)
        return snap.globals, [(v, snap.vip_counters(v)) for v in snap.vips]

    def snapshot(self, key: VipKey | None = None) -> "Snapshot":
        """The VIPs and every counter, read together under the lock: an index
        cannot change hands between reading who holds it and reading its counts."""
        with self.lock:
            vips = [self.model.get(key).clone()] if key else self.list_vips()
            indices = {a: b.index for a, b in self.model.backends.items()}
            return Snapshot(vips, indices, self.dp.global_stats(), self.dp.counter_tables())

    def counts(self) -> tuple[int, int]:
        """(VIPs, backends)."""
        with self.lock:
            return len(self.model.vips), len(self.model.backends)

    def status(self) -> dict:
        with self.lock:
            modes = set(self.attach_modes.values())
            attach_mode = self.attach_mode if len(modes) < 2 else ", ".join(
                f"{i} {m}" for i, m in self.attach_modes.items())
            out = {"interface": self.interface, "attach_mode": attach_mode,
                   "interfaces": list(self.interfaces), "next_hop": self.runtime.next_hop,
                   "vips": len(self.model.vips), "backends": len(self.model.backends),
                   "uptime": time.monotonic() - self.started,
                   "conntrack_used": self.dp.conntrack_size(), "program_id": 0}
        if self.interface and self.attach_mode != "none":
            now = netlink.xdp_program(self.interface)
            out["program_id"] = now[0] if now else 0
        # the kernel's own figure for pinned maps; the compiled sizes otherwise
        out["kernel_bytes"] = (bpf.maps_memory(self.pin_dir) if self.pin_dir else 0) or bpf.maps_size(self.dp.prog)
        return out


class Snapshot:
    """VIPs, backend indices and counters read at one moment (Controller.snapshot)."""

    def __init__(self, vips, indices: dict[str, int], globals_: dict[str, int], tables: dict):
        from . import consts  # noqa: PLC0415

        self.vips, self.indices, self.globals = vips, indices, globals_
        self._vip, self._vip_fields = tables[consts.MAP_VIP_STATS]
        self._flows = tables[consts.MAP_VIP_FLOWS][0]
        self._backend, self._backend_fields = tables[consts.MAP_BACKEND_STATS]

    def backend_counters(self, address: str) -> dict[str, int]:
        row = self._backend[self.indices[address]]
        return {f: int(row[i]) for i, f in enumerate(self._backend_fields)}

    def vip_counters(self, v) -> dict:
        row = self._vip[v.vip_id]
        out = {f: int(row[i]) for i, f in enumerate(self._vip_fields)}
        out["new_flows"] = int(self._flows[v.vip_id][0])
        out["backends"] = {a: self.backend_counters(a) for a in sorted(v.backends)}
        return out


class _only:
    """A listener that hears one VIP's events."""

    __slots__ = ("key", "listener")

    def __init__(self, key: VipKey, listener):
        self.key, self.listener = key, listener

    def __call__(self, event: HealthEvent) -> None:
        if event.vip == self.key:
            self.listener(event)


def describe_step(kind: str, obj) -> str:
    """One line for a step of apply()."""
    if kind == "delete":
        return f"deleted {obj}"
    if kind == "runtime":
        return "set " + ", ".join(obj)
    return {"add": "added", "flags": "changed flags of", "encap": "changed the encapsulation of",
            "backends": "changed backends of",
            "health": "changed the health check of"}[kind] + f" {obj.key}"


def plan(current: dict, cfg: LbConfig) -> list[tuple[str, object]]:
    """The steps, in order, from the current VIPs ({VipKey: (flags, {addr:
    weight}, encap)}) to a configuration's."""
    want = {v.key: v for v in cfg.vips}
    steps: list[tuple[str, object]] = []
    for key in current:
        if key not in want:
            steps.append(("delete", key))
    for key, spec in want.items():
        if key not in current:
            steps.append(("add", spec))
            continue
        flags, backends, encap = current[key]
        if set(flags) != set(spec.flags):
            steps.append(("flags", spec))
        if encap != spec.encap:
            steps.append(("encap", spec))
        if backends != spec.backends:
            steps.append(("backends", spec))
    return steps
