"""`l4lb run`: command-line options in, an LbNode (l4lb/node.py: adopt or
load, attach) plus the gRPC server around it, until a signal."""
from __future__ import annotations

import logging
from pathlib import Path

from l4lb import consts
from l4lb.announce import parse_table
from l4lb.config import load_config
from l4lb.errors import ValidationError
from l4lb.node import LbNode, NodeOptions

from .server import Tls, check_listen, create_server, serve
from .servicer import LoadBalancerServicer

log = logging.getLogger("l4lb.run")


def tls_options(args) -> Tls | None:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValidationError("--tls-cert and --tls-key go together: give both, or neither")
    if args.tls_client_ca and not args.tls_cert:
        raise ValidationError("--tls-client-ca needs --tls-cert and --tls-key (the server's own certificate)")
    if not args.tls_cert:
        return None
    return Tls(Path(args.tls_cert), Path(args.tls_key), Path(args.tls_client_ca) if args.tls_client_ca else None)


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="l4lb: %(message)s")
    # the listener is checked before the program is loaded: a refusal leaves the interface as it was
    tls = tls_options(args)
    check_listen(args.listen, tls, args.insecure_allow_unauthenticated)
    table = parse_table(args.announce) if args.announce is not None else None
    exporter = None
    if (args.metrics_allow_remote or args.metrics_max_pairs is not None) and not args.metrics_listen:
        raise ValidationError("--metrics-allow-remote and --metrics-max-pairs go with --metrics-listen ADDRESS:PORT")
    if args.metrics_listen:  # bound now: a port in use is refused with nothing attached
        from .metrics import DEFAULT_MAX_PAIRS, Exporter, parse_metrics_listen  # noqa: PLC0415

        host, port = parse_metrics_listen(args.metrics_listen, args.metrics_allow_remote)
        exporter = Exporter(host, port, max_pairs=args.metrics_max_pairs or DEFAULT_MAX_PAIRS)
        exporter.bind()
    try:
        return _run(args, tls, exporter, table)
    finally:
        if exporter:
            exporter.close()


def _run(args, tls, exporter, table) -> int:
    opts = NodeOptions(
        interface=args.interface[0], more_interfaces=tuple(args.interface[1:]), next_hop=args.next_hop,
        capacity=consts.Capacity(max_vips=args.max_vips, max_backends=args.max_backends,
                                 ct_size=args.ct_size, ring_size=args.ring_size),
        state_dir=Path(args.state_dir), attach_mode=args.attach_mode, force=args.force,
        config=load_config(args.config) if args.config else None, announce_table=table)
    node = LbNode.open(opts)
    servicer = LoadBalancerServicer(node.ctrl, resolve_neighbour=node.resolve_neighbour,
                                    lookup_flow=node.ctrl.lookup_flow, announcer=node.announcer)
    server, port = create_server(servicer, args.listen, tls=tls, group=args.group,
                                 allow_unauthenticated=args.insecure_allow_unauthenticated,
                                 observe=exporter.observe_request if exporter else None)
    log.info("serving gRPC on %s", args.listen if args.listen.startswith("unix:") else f"port {port}")
    if exporter:
        exporter.start(node.ctrl, node.prog)
        log.info("serving metrics on http://%s/metrics",
                 f"[{exporter.host}]:{exporter.port}" if ":" in exporter.host else f"{exporter.host}:{exporter.port}")
    serve(server, lambda: node.close(detach=args.detach))
    return 0
