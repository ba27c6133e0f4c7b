"""`l4lb run`: load (or adopt) the program, attach it, serve gRPC.

The maps are pinned under /sys/fs/bpf/l4lb/<interface>/ and the control
plane's own state (ids, generations, weights) is kept in a file replaced
atomically on every change. A new `l4lb run` on the same interface adopts
both, so traffic keeps flowing while the control plane is down and nothing
changes when it comes back. The program stays attached on exit unless
--detach is given."""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from l4lb import bpf, consts, netlink
from l4lb.config import load_config, check_capacity
from l4lb.controller import Controller, apply_runtime
from l4lb.dataplane import Dataplane, RuntimeConfig
from l4lb.errors import StateError
from l4lb.lookup import lookup_flow

from .server import Tls, create_server, serve
from .servicer import LoadBalancerServicer

log = logging.getLogger("l4lb.run")
PIN_ROOT = Path("/sys/fs/bpf/l4lb")
STATE_ROOT = Path("/var/lib/l4lb")


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="l4lb: %(message)s")
    cap = consts.Capacity(max_vips=args.max_vips, max_backends=args.max_backends,
                          ct_size=args.ct_size, ring_size=args.ring_size)
    ifname = args.interface
    netlink.ifindex(ifname)
    netlink.require_bpftool()
    pin_dir = PIN_ROOT / ifname
    state_file = Path(args.state_dir) / ifname / "state.json"
    cfg = load_config(args.config) if args.config else None
    if cfg:
        check_capacity(cfg, cap)

    saved = Controller.read_saved(state_file) if pin_dir.exists() else None
    if pin_dir.exists() and saved is None:
        raise StateError(f"{pin_dir} holds pinned maps but {state_file} is missing; "
                         f"remove {pin_dir} to start empty")
    if saved:
        old = consts.Capacity(**saved["capacity"])
        if old != cap:
            raise StateError(f"the pinned maps were made with {asdict(old)}, this run asks for "
                             f"{asdict(cap)}; run with the same sizes, or stop traffic and remove "
                             f"{pin_dir} and {state_file} to start over")
    if saved and saved.get("source_hash") != bpf.source_hash(cap):
        _check_layout(cap, str(pin_dir))
    current = netlink.xdp_program(ifname)
    if current and current[1] != consts.PROG_BALANCER and not args.force:
        raise StateError(f"{ifname} runs XDP program {current[1] or '?'} (id {current[0]}), not l4lb's; "
                         "use --force to replace it")

    prog = bpf.load_balancer(cap, pin_dir=str(pin_dir))
    dp = Dataplane(prog, cap)
    runtime = cfg.runtime if cfg else None
    ctrl = Controller(dp, runtime or RuntimeConfig(),
                      state_file, ifname)
    ctrl.source_hash = bpf.source_hash(cap)
    if saved:
        ctrl.adopt(saved)
        log.info("adopted pinned state: %d VIPs, %d backends", len(ctrl.state.vips), len(ctrl.state.backends))
        if cfg and cfg.gateway_set:
            apply_runtime(ctrl, cfg.runtime)
    else:
        if not (cfg and cfg.gateway_set):
            log.warning("no gateway MAC yet: every packet passes until SetGateway (or gateway_mac in --config)")
        else:
            apply_runtime(ctrl, cfg.runtime)
        ctrl.save()
    if cfg:
        from .apply import apply_config  # noqa: PLC0415

        apply_config(ctrl, cfg)

    attached = netlink.xdp_program(ifname)
    if saved and attached and attached[2] == prog.fdinfo().get("prog_tag"):
        # the same code is running on the adopted maps: leave it in place
        ctrl.attach_mode = saved.get("attach_mode", "native")
        prog.ifname, prog.attach_mode = ifname, ctrl.attach_mode
    else:
        # a running program is swapped in one step (XDP_FLAGS_REPLACE), never detached first
        mode = args.attach_mode
        if attached and mode == "auto" and saved:
            mode = saved.get("attach_mode", "auto")
        ctrl.attach_mode = prog.attach(ifname, mode, replace_id=attached[0] if attached else None)
        attached = netlink.xdp_program(ifname)
    ctrl.save()
    log.info("attached to %s (%s mode, program id %s)", ifname, ctrl.attach_mode, attached[0] if attached else "?")
    base_status = ctrl.status

    def status():
        s = base_status()
        now = netlink.xdp_program(ifname)
        s["program_id"] = now[0] if now else 0
        s["conntrack_used"] = dp.conntrack_size()
        s["kernel_bytes"] = bpf.maps_memory(str(pin_dir))
        return s

    ctrl.status = status
    tls = Tls(Path(args.tls_cert), Path(args.tls_key), Path(args.tls_client_ca) if args.tls_client_ca else None) \
        if args.tls_cert else None
    servicer = LoadBalancerServicer(
        ctrl, resolve_neighbour=lambda ip: netlink.resolve_mac(ifname, ip),
        lookup_flow=lambda *a: _locked_lookup(ctrl, prog, *a))
    server, port = create_server(servicer, args.listen, tls=tls, group=args.group)
    log.info("serving gRPC on %s", args.listen if args.listen.startswith("unix:") else f"port {port}")

    def on_stop():
        if args.detach:
            prog.detach()
            bpf.remove_pins(str(pin_dir))
            state_file.unlink(missing_ok=True)
            log.info("detached from %s and removed the pinned maps", ifname)
        else:
            log.info("stopped serving; the program stays attached to %s", ifname)

    serve(server, on_stop)
    return 0


def _check_layout(cap: consts.Capacity, pin_dir: str) -> None:
    """A new program may only adopt pinned maps of exactly its own layout."""
    probe = bpf.load_balancer(cap)  # not pinned: only to learn the new layout
    try:
        new = bpf.layout_of(probe)
    finally:
        probe.close()
    old = bpf.pinned_layout(pin_dir)
    diff = [f"{n}: pinned {old[n]}, new {new[n]}" for n in old if n in new and old[n] != new[n]]
    if diff:
        raise StateError("the pinned maps have another layout than this program "
                         f"((key, value, entries): {'; '.join(diff)}); a layout change needs new map "
                         f"names, or stop traffic and remove {pin_dir} to start over")


def _locked_lookup(ctrl, prog, *args):
    with ctrl.lock:
        return lookup_flow(prog, *args)
