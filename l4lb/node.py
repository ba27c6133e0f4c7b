"""The load balancer on one interface, as `l4lb run` holds it below the gRPC
layer: adopt the pinned maps and saved state of a previous process, or load
fresh ones; attach (or keep, or atomically replace) the program; apply a
configuration given at start; detach on request.

The maps are pinned under PIN_ROOT/<interface>/ and the control plane's own
state (ids, generations, weights) is kept in STATE_ROOT/<interface>/state.json,
replaced atomically on every change. A new process on the same interface
adopts both, so traffic keeps flowing while the control plane is down and
nothing changes when it comes back."""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from . import bpf, consts, libbpf, netlink
from .announce import Announcer, withdraw_saved
from .checker import HealthChecker
from .config import LbConfig, check_capacity
from .controller import Controller
from .dataplane import Dataplane, RuntimeConfig
from .errors import StateError, ValidationError

log = logging.getLogger("l4lb.node")


@dataclass
class NodeOptions:
    interface: str
    capacity: consts.Capacity = consts.Capacity()
    state_dir: Path = Path(consts.STATE_ROOT)
    pin_root: Path = Path(consts.PIN_ROOT)
    attach_mode: str = "auto"  # auto, native or generic
    force: bool = False  # replace an XDP program that is not l4lb's
    config: LbConfig | None = None  # the desired state to apply at start
    announce_table: int | None = None  # announce live VIPs as host routes in this table (announce.py)
    more_interfaces: tuple[str, ...] = ()  # the same program and maps on these too
    next_hop: str | None = None  # gateway | fib: overrides the configuration's and the saved state's

    @property
    def interfaces(self) -> tuple[str, ...]:
        return (self.interface, *self.more_interfaces)


def lock_interface(ifname: str, root: Path = Path(consts.LOCK_ROOT)) -> int:
    """Takes the interface's lock for the life of this process (flock: the
    kernel drops it when the process dies, however it dies). Returns the fd."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{ifname}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StateError(f"interface {ifname} is owned by another l4lb run (pid {owner}, lock {path}); "
                         "stop that one first") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class LbNode:
    def __init__(self, opts: NodeOptions, prog: bpf.Program, ctrl: Controller, adopted: bool):
        self.opts = opts
        self.prog = prog
        self.ctrl = ctrl
        self.adopted = adopted
        self.checker: HealthChecker | None = None
        self.probe_encap = None  # bpf.TcProgram, once a tunnel probe needs it
        self.announcer: Announcer | None = None
        self.route_watch: netlink.RouteWatch | None = None  # bumps fib_gen on route/neighbour changes

    @property
    def pin_dir(self) -> Path:
        return self.opts.pin_root / self.opts.interface

    @classmethod
    def open(cls, opts: NodeOptions) -> "LbNode":
        """Adopts or loads, applies opts.config, attaches. Nothing is attached
        or changed when a check fails."""
        ifname, cap, cfg = opts.interface, opts.capacity, opts.config
        names = opts.interfaces
        if len(set(names)) != len(names):
            raise ValidationError(f"--interface: {next(n for n in names if names.count(n) > 1)} is given twice")
        if len(names) > consts.MAX_INTERFACES:
            raise ValidationError(f"--interface: {len(names)} interfaces, at most {consts.MAX_INTERFACES}")
        for n in names:
            netlink.ifindex(n)
        netlink.require_bpftool()
        pin_dir = opts.pin_root / ifname
        state_file = opts.state_dir / ifname / "state.json"
        if cfg:
            check_capacity(cfg, cap)
        lock_fds: list[int] = []
        try:
            for n in names:  # every interface has one owner
                lock_fds.append(lock_interface(n))
            node = cls._open(opts, pin_dir, state_file, lock_fds[0])
            node.lock_fds = lock_fds
            return node
        except BaseException:
            for fd in lock_fds:
                os.close(fd)
            raise

    @classmethod
    def _open(cls, opts: NodeOptions, pin_dir: Path, state_file: Path, lock_fd: int) -> "LbNode":
        ifname, cap, cfg = opts.interface, opts.capacity, opts.config
        pinned = pin_dir.exists()
        saved = Controller.read_saved(state_file)
        if pinned and saved is None:
            raise StateError(f"{pin_dir} holds pinned maps but {state_file} is missing; "
                             f"remove {pin_dir} to start empty")
        if saved:
            try:
                old = consts.Capacity(**saved["capacity"])
            except TypeError:
                raise StateError(f"{state_file}: the capacity section is malformed; move the file away "
                                 "(and the pinned maps) to start empty") from None
            if old != cap:
                raise StateError(f"the pinned maps were made with {asdict(old)}, this run asks for "
                                 f"{asdict(cap)}; run with the same sizes, or stop traffic and remove "
                                 f"{pin_dir} and {state_file} to start over")
        if pinned and saved.get("source_hash") != bpf.source_hash(cap):
            _check_layout(cap, pin_dir)
        for n in opts.interfaces:
            current = netlink.xdp_program(n)
            if current and current[1] != consts.PROG_BALANCER and not opts.force:
                raise StateError(f"{n} runs XDP program {current[1] or '?'} (id {current[0]}), not l4lb's; "
                                 "use --force to replace it")
        runtime = _start_runtime(opts, saved)
        if runtime and runtime.next_hop == "fib":
            check_forwarding(opts.interfaces)

        prog = bpf.load_balancer(cap, pin_dir=str(pin_dir))
        dp = Dataplane(prog, cap)
        ctrl = Controller(dp, cfg.runtime if cfg else RuntimeConfig(), state_file, ifname,
                          pin_dir=str(pin_dir))
        ctrl.source_hash = bpf.source_hash(cap)
        ctrl.interfaces = list(opts.interfaces)
        ctrl.check_runtime = lambda rt: check_forwarding(opts.interfaces) if rt.next_hop == "fib" else None
        if saved:
            ctrl.adopt(saved)
            if pinned:
                log.info("adopted pinned state: %d VIPs, %d backends", *ctrl.counts())
            else:
                log.warning("no pinned maps (after a reboot?): restored %d VIPs, %d backends from %s "
                            "into fresh maps", *ctrl.counts(), state_file)
            if runtime and asdict(runtime) != asdict(ctrl.runtime):
                ctrl.set_runtime(runtime)
        else:
            if runtime is None:
                log.warning("no gateway MAC yet: every packet passes until SetGateway (or gateway_mac in --config, "
                            "or next_hop fib)")
            else:
                ctrl.set_runtime(runtime)
            ctrl.save()
        if cfg:
            ctrl.apply(cfg)
        node = cls(opts, prog, ctrl, adopted=bool(saved))
        node.lock_fd = lock_fd
        node._attach(saved if pinned else None)
        node._detach_left(saved)
        node.route_watch = netlink.RouteWatch(node._fib_changed)
        node.checker = HealthChecker(ctrl, ensure_tunnel=node._ensure_probe_encap)
        ctrl.health_details = node.checker.details
        if opts.announce_table:
            # the program this run attached, or the one it kept running (adopted: not prog's own id)
            prog_id = netlink.xdp_prog_id(ifname)
            node.announcer = Announcer(ctrl, opts.announce_table, opts.state_dir / ifname / "announce.json",
                                       attached=lambda: prog_id != 0 and netlink.xdp_prog_id(ifname) == prog_id)
            node.announcer.start()
            log.info("announcing live VIPs in routing table %d%s", opts.announce_table,
                     " (drained: none now)" if node.announcer.drained else "")
        else:
            gone = withdraw_saved(opts.state_dir / ifname / "announce.json")
            if gone:
                log.warning("withdrew %d VIP routes a run with --announce left (this run announces nothing)", gone)
        return node

    def _ensure_probe_encap(self) -> None:
        """The tc program that carries tunnel probes, loaded and attached once."""
        if self.probe_encap is None:
            prog = bpf.load_probe_encap(self.opts.capacity, str(self.pin_dir))
            prog.attach_egress(self.opts.interface, replace=True)
            self.probe_encap = prog
            log.info("health: tunnel probes leave %s through the probe encapsulation program", self.opts.interface)

    def _attach(self, saved: dict | None) -> None:
        """The program on every interface, then tx_ports listing exactly them
        (next_hop fib redirects only there)."""
        ctrl, prog = self.ctrl, self.prog
        saved_modes = dict((saved or {}).get("attach_modes") or {})
        if saved and self.opts.interface not in saved_modes:
            saved_modes[self.opts.interface] = saved.get("attach_mode", "native")
        modes: dict[str, str] = {}
        for ifname in self.opts.interfaces:
            attached = netlink.xdp_program(ifname)
            if ifname in saved_modes and attached and attached[2] == prog.fdinfo().get("prog_tag"):
                # the same code is running on the adopted maps: leave it in place
                modes[ifname] = saved_modes[ifname]
                prog.attached[ifname] = modes[ifname]
            else:
                # a running program is swapped in one step (XDP_FLAGS_REPLACE), never detached first
                mode = self.opts.attach_mode
                if attached and mode == "auto" and ifname in saved_modes:
                    mode = saved_modes[ifname]
                modes[ifname] = prog.attach(ifname, mode, replace_id=attached[0] if attached else None)
                attached = netlink.xdp_program(ifname)
            log.info("attached to %s (%s mode, program id %s)", ifname, modes[ifname],
                     attached[0] if attached else "?")
        prog.ifname, prog.attach_mode = self.opts.interface, modes[self.opts.interface]
        ctrl.attach_mode, ctrl.attach_modes = modes[self.opts.interface], modes
        ctrl.dp.set_tx_ports([netlink.ifindex(n) for n in self.opts.interfaces])
        ctrl.save()

    def _detach_left(self, saved: dict | None) -> None:
        """An interface the previous run was attached to and this one is not
        loses the program (only if it runs l4lb's)."""
        for ifname, mode in ((saved or {}).get("attach_modes") or {}).items():
            if ifname in self.opts.interfaces:
                continue
            try:
                current = netlink.xdp_program(ifname)
            except ValidationError:
                continue  # gone meanwhile
            if current and current[1] == consts.PROG_BALANCER:
                libbpf.xdp_detach(netlink.ifindex(ifname), mode)
                log.info("detached from %s (the previous run's interface; not given this time)", ifname)

    def _fib_changed(self) -> None:
        """next_hop fib: the answers the program keeps per CPU are asked again."""
        with self.ctrl.lock:
            self.ctrl.dp.bump_fib_gen()

    def resolve_neighbour(self, ip: str) -> str:
        for ifname in self.opts.interfaces[1:]:
            try:
                return netlink.resolve_mac(ifname, ip)
            except ValidationError:
                continue
        return netlink.resolve_mac(self.opts.interface, ip)

    def close(self, detach: bool = False) -> None:
        """Leaves the program attached (traffic flows on), or with detach
        removes it, its pinned maps and the saved state."""
        if self.route_watch:
            self.route_watch.stop()
        if self.checker:
            self.checker.stop()
        if self.announcer:
            self.announcer.stop(withdraw=detach)  # routes go before the program does
        if detach:
            if self.probe_encap is not None:
                self.probe_encap.detach(remove_qdisc=True)  # no trace: the qdisc too, unless others use it
            self.prog.detach()
            bpf.remove_pins(str(self.pin_dir))
            self.ctrl.state_file.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.ctrl.state_file.with_name(self.ctrl.state_file.name + ".tmp").unlink()
            log.info("detached from %s and removed the pinned maps", ", ".join(self.opts.interfaces))
        else:
            log.info("stopped serving; the program stays attached to %s", ", ".join(self.opts.interfaces))


def check_forwarding(interfaces) -> None:
    """next_hop fib asks the FIB as a router would: the kernel answers only for
    packets that come in on an interface that forwards."""
    off = [name for i in interfaces for name in netlink.forwarding_off(i)]
    if off:
        raise ValidationError(f"next_hop fib needs forwarding on: {', '.join(off)} is 0 "
                              "(set it to 1, or use next_hop gateway)")


def _start_runtime(opts: NodeOptions, saved: dict | None) -> RuntimeConfig | None:
    """The runtime this start writes: the configuration's when it sets the
    gateway (or next_hop), else the saved one's; --next-hop over either.
    None: nothing to write (a fresh start with no gateway and no fib: every
    packet passes until SetGateway)."""
    cfg = opts.config
    if saved:
        try:
            rt = Controller.runtime_of(saved)
        except StateError:
            rt = None  # adopt() says what is wrong with it
        if cfg and cfg.gateway_set:
            rt = RuntimeConfig(**asdict(cfg.runtime))
        elif cfg and cfg.next_hop_set and rt is not None:
            rt = RuntimeConfig(**{**asdict(cfg.runtime), "gateway_mac": rt.gateway_mac})
    else:
        rt = RuntimeConfig(**asdict(cfg.runtime)) if cfg else RuntimeConfig()
    if rt is not None and opts.next_hop:
        rt.next_hop = opts.next_hop
    if not saved and not (cfg and cfg.gateway_set) and rt.next_hop != "fib":
        return None
    return rt


def _check_layout(cap: consts.Capacity, pin_dir: Path) -> None:
    """A new program may only adopt pinned maps of exactly its own layout."""
    probe = bpf.load_balancer(cap)  # not pinned: only to learn the new layout
    try:
        diff = bpf.layout_differences(str(pin_dir), probe)
    finally:
        probe.close()
    if diff:
        raise StateError("the pinned maps have another layout than this program "
                         f"({'; '.join(diff)}); a layout change needs new map "
                         f"names, or stop traffic and remove {pin_dir} to start over")
