"""The `l4lb` verbs of a fleet: `node drain|undrain|show`, `bird-config`, and
`apply` / `status` against several servers (--server A --server B ...)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from rich.table import Table

from l4lb.announce import DEFAULT_TABLE, bird_config

from .l4lb.v1 import l4lb_pb2 as pb


def add_node(sub, add_connection, client) -> None:
    node = sub.add_parser("node", help="this node in a fleet: drain, undrain, show what it announces",
                          epilog="examples:\n  l4lb node drain     # withdraw every VIP, keep forwarding\n"
                                 "  l4lb node undrain\n  l4lb node show",
                          formatter_class=argparse.RawDescriptionHelpFormatter).add_subparsers(dest="verb", required=True)
    for name, hlp in (("drain", "withdraw every VIP this node announces; forwarding goes on"),
                      ("undrain", "announce the live VIPs again"),
                      ("show", "the announcement table, drained or not, what is announced")):
        p = node.add_parser(name, help=hlp)
        p.set_defaults(func=lambda args, name=name: cmd_node(args, name, client))
        add_connection(p)


def _print_node(out, server: str, table: int, drained: bool, announced) -> None:
    if not table:
        out.print(f"{server}: announces nothing (l4lb run without --announce)")
        return
    out.print(f"{server}: table {table}, {'drained' if drained else 'serving'}, "
              f"announced: {', '.join(announced) or 'none'}")


def cmd_node(args, verb: str, client) -> int:
    from .verbs import out  # noqa: PLC0415

    with client(args) as c:
        if verb == "show":
            s = c.call("GetStatus", pb.GetStatusRequest())
            _print_node(out, args.server, s.announce_table, s.drained, s.announced)
            return 0
        r = c.call("SetDrain", pb.SetDrainRequest(drained=verb == "drain"))
    _print_node(out, args.server, r.announce_table, r.drained, r.announced)
    return 0


def add_bird_config(sub) -> None:
    b = sub.add_parser("bird-config", help="print a BIRD 2 configuration for this LB node",
                       epilog="example:\n  l4lb bird-config --router-id 198.18.1.6 --local-as 64513 \\\n"
                              "      --neighbor 198.18.1.5 64512 --neighbor fd00:198:18:1:1::1 64512 "
                              "> /etc/bird/bird.conf\n(see deploy/bird-lb.conf and README.md)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--router-id", required=True, help="BIRD's router id (an IPv4 address of this node)")
    b.add_argument("--local-as", required=True, help="this node's AS number")
    b.add_argument("--neighbor", nargs=2, action="append", default=[], metavar=("ADDRESS", "AS"),
                   help="a router on a link of this node and its AS, repeatable")
    b.add_argument("--table", default=str(DEFAULT_TABLE), help=f"the table of `l4lb run --announce` (default {DEFAULT_TABLE})")
    b.add_argument("--no-bfd", action="store_true", help="no BFD (failure detection by the BGP hold time only)")
    b.add_argument("--bfd-interval", type=int, default=100, help="BFD interval in ms (default 100)")
    b.add_argument("--bfd-multiplier", type=int, default=3, help="missed BFD packets that mean down (default 3)")
    b.add_argument("--hold-time", type=int, default=9, help="BGP hold time in seconds (default 9)")
    b.set_defaults(func=cmd_bird_config)


def cmd_bird_config(args) -> int:
    sys.stdout.write(bird_config(args.router_id, args.local_as, [tuple(n) for n in args.neighbor], args.table,
                                 bfd=not args.no_bfd, bfd_interval_ms=args.bfd_interval,
                                 bfd_multiplier=args.bfd_multiplier, hold_time=args.hold_time))
    return 0


# ---- one configuration, many nodes ---------------------------------------------------------

def apply_many(args, servers: list[str], make_client) -> int:
    """Applies the file to each server in turn and reports per server; exit 1
    if any failed (the others keep what they applied: apply again once the
    failed one is fixed)."""
    from .verbs import out  # noqa: PLC0415

    text = Path(args.file).read_text()
    failed = 0
    for server in servers:
        try:
            with make_client(server) as c:
                r = c.call("Apply", pb.ApplyRequest(config_yaml=text, dry_run=args.dry_run))
        except grpc.RpcError as e:
            failed += 1
            out.print(f"{server}: {e.code().name}: {' '.join((e.details() or '').split())}")
            continue
        out.print(f"{server}: {len(r.changes)} change(s) {'would be applied' if args.dry_run else 'applied'}")
        for line in r.changes:
            out.print(f"  {line}")
    if failed:
        out.print(f"{failed} of {len(servers)} nodes failed")
    return 1 if failed else 0


def compare(statuses: dict[str, pb.Status]) -> list[tuple[str, str]]:
    """(VIP, how it differs) for each VIP that is not the same on every node."""
    tables: dict[str, dict[str, tuple[str, str]]] = {}
    for server, s in statuses.items():
        for d in s.digests:
            host = f"[{d.id.address}]" if ":" in d.id.address else d.id.address
            tables.setdefault(f"{host}:{d.id.port}/{d.id.protocol}", {})[server] = (d.ring, d.backends)
    out = []
    for vip in sorted(tables):
        per = tables[vip]
        missing = [s for s in statuses if s not in per]
        values = set(per.values())
        if not missing and len(values) == 1:
            continue
        parts = []
        if missing:
            parts.append("missing on " + ", ".join(missing))
        if len(values) > 1:
            groups: dict[tuple[str, str], list[str]] = {}
            for server, v in per.items():
                groups.setdefault(v, []).append(server)
            parts.append("; ".join(f"ring {v[0]} backends {v[1]} on {', '.join(ss)}" for v, ss in groups.items()))
        out.append((vip, "; ".join(parts)))
    return out


def status_many(servers: list[str], make_client) -> int:
    """Each node's status and whether they all hold identical tables; exit 1
    when they differ or a node does not answer."""
    from .verbs import out  # noqa: PLC0415

    statuses: dict[str, pb.Status] = {}
    unreachable = []
    for server in servers:
        try:
            with make_client(server) as c:
                statuses[server] = c.call("GetStatus", pb.GetStatusRequest())
        except grpc.RpcError as e:
            unreachable.append(server)
            out.print(f"{server}: {e.code().name}: {' '.join((e.details() or '').split())}")
    t = Table(title="nodes")
    for col in ("server", "interface", "program", "VIPs", "backends", "announced", "drained"):
        t.add_column(col)
    for server, s in statuses.items():
        t.add_row(server, s.interface, str(s.program_id), str(s.vips), str(s.backends),
                  (str(len(s.announced)) if s.announce_table else "-"), "yes" if s.drained else "no")
    out.print(t)
    diff = compare(statuses)
    if diff:
        out.print(f"tables differ: {len(diff)} VIP(s)")
        for vip, how in diff:
            out.print(f"  {vip}: {how}")
    elif statuses:
        n = len(next(iter(statuses.values())).digests)
        out.print(f"all {len(statuses)} nodes that answered hold identical tables ({n} VIPs)")
    if unreachable:
        out.print(f"no answer from {', '.join(unreachable)}")
    return 1 if diff or unreachable else 0
