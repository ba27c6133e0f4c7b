"""`l4lb health`: each backend's health as the checks see it (`l4lb health
[VIP]`, the same as `show`), its transitions live (`--watch`, through the
WatchHealth stream, reconnecting when the server restarts), and a VIP's
check set or removed (`set`, `clear`)."""
from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.table import Table

from l4lb import health

from .client import Client, parse_vip, vip_text
from .l4lb.v1 import l4lb_pb2 as pb

out = Console(markup=False, highlight=False)
VERBS = ("show", "set", "clear")


def default_verb(argv: list[str]) -> list[str]:
    """`l4lb health [VIP] [--watch]` means `l4lb health show [VIP] [--watch]`."""
    if argv[:1] == ["health"] and not (len(argv) > 1 and argv[1] in (*VERBS, "-h", "--help")):
        return ["health", "show", *argv[1:]]
    return argv


def add_parser(sub, conn, client) -> None:
    """conn(parser) adds the connection options; client(args) makes a Client."""
    h = sub.add_parser("health", help="backend health: show (the default), watch, set or clear a VIP's check",
                       description="l4lb health [VIP] [--watch] is short for l4lb health show [VIP] [--watch]"
                       ).add_subparsers(
        dest="verb", required=True)
    s = h.add_parser("show", help="each backend's state, effective weight and last probe (also: l4lb health [VIP])")
    s.add_argument("vip", nargs="?", help="ADDRESS[:PORT]/PROTOCOL (default: every VIP with a check)")
    s.add_argument("--watch", action="store_true",
                   help="the current states, then each transition as it happens, until Ctrl-C")
    s.set_defaults(func=lambda a: cmd_show(a, client))
    st = h.add_parser("set", help="give a VIP a health check (README.md, Health checks)")
    st.add_argument("vip")
    st.add_argument("--kind", choices=health.KINDS[:2], default="tcp")
    st.add_argument("--port", type=int, default=0, help="default: the VIP's port")
    st.add_argument("--interval", type=float, default=0.0, help="seconds (default 2)")
    st.add_argument("--timeout", type=float, default=0.0, help="seconds (default 1)")
    st.add_argument("--rise", type=int, default=0, help="default 2")
    st.add_argument("--fall", type=int, default=0, help="default 3")
    st.add_argument("--path", default="", help="http: the path to GET (default /)")
    st.add_argument("--host", default="", help="http: the Host header")
    st.add_argument("--expect", type=int, action="append", default=[], help="http: a status code (repeatable; default 200)")
    st.add_argument("--via", choices=health.ROUTES, default="", help="tunnel (default) or direct")
    st.add_argument("--min-healthy", type=int, default=0, help="percent below which health is ignored (default 50)")
    st.set_defaults(func=lambda a: cmd_set(a, client))
    cl = h.add_parser("clear", help="remove a VIP's check (every backend counts as up)")
    cl.add_argument("vip")
    cl.set_defaults(func=lambda a: cmd_clear(a, client))
    for p in (s, st, cl):
        conn(p)


def _table(vips) -> Table:
    t = Table(title="health")
    for col in ("VIP", "backend", "state", "weight", "effective", "last probe", "latency", "since"):
        t.add_column(col)
    for v in vips:
        if not v.HasField("health"):
            continue
        name = vip_text(v.id) + ("  PANIC: every backend serves" if v.panic else "")
        for b in v.backends:
            since = time.strftime("%H:%M:%S", time.localtime(b.since)) if b.since else "-"
            t.add_row(name, b.address, b.health or "-", str(b.weight), str(b.effective_weight),
                      b.last_result or "-", f"{b.latency_seconds * 1e3:.1f} ms" if b.latency_seconds else "-", since)
            name = ""
    return t


def _vips(c: Client, args):
    if args.vip:
        return [c.call("GetVip", pb.GetVipRequest(id=parse_vip(args.vip)))]
    return [c.call("GetVip", pb.GetVipRequest(id=v.id)) for v in c.call("ListVips", pb.ListVipsRequest()).vips]


def cmd_show(args, client) -> int:
    if args.watch:
        return watch(args, client)
    with client(args) as c:
        vips = _vips(c, args)
    if not any(v.HasField("health") for v in vips):
        out.print(f"{args.vip}: no health check" if args.vip else "no VIP has a health check")
        return 0
    out.print(_table(vips))
    return 0


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "--:--:--"


def watch(args, client) -> int:
    """One line per backend as it stands, then one per transition. After a
    reconnect the new snapshot is compared with what was known: a backend that
    changed meanwhile gets its transition line, marked as such."""
    from .verbs import follow  # noqa: PLC0415

    req = pb.WatchHealthRequest(id=parse_vip(args.vip) if args.vip else None, snapshot=True)
    known: dict[tuple[str, str], str] = {}

    def line(e: pb.HealthEvent) -> None:
        vip = vip_text(e.id)
        before = known.get((vip, e.backend))
        known[(vip, e.backend)] = e.new_state
        panic = "  PANIC: every backend serves" if e.panic else ""
        reason = e.reason or "-"
        if not e.snapshot:
            text = f"{e.old_state} -> {e.new_state} ({reason})"
        elif before is None:
            text = f"{e.new_state} (since {_clock(e.time)}; last probe: {reason})"
        elif before != e.new_state:
            text = f"{before} -> {e.new_state} ({reason}; while the stream was down)"
        else:
            return
        print(f"{_clock(e.time)}  {vip}  {e.backend}  {text}{panic}", flush=True)

    return follow(args, lambda c: c.stub.WatchHealth(req), line)


def cmd_set(args, client) -> int:
    check = pb.HealthCheck(kind=args.kind, port=args.port, interval=args.interval, timeout=args.timeout,
                           rise=args.rise, fall=args.fall, path=args.path, host=args.host, expect=args.expect,
                           via=args.via, min_healthy=args.min_healthy)
    with client(args) as c:
        v = c.call("SetHealthCheck", pb.SetHealthCheckRequest(id=parse_vip(args.vip), health=check))
    out.print(_table([v]))
    return 0


def cmd_clear(args, client) -> int:
    with client(args) as c:
        c.call("SetHealthCheck", pb.SetHealthCheckRequest(id=parse_vip(args.vip), health=pb.HealthCheck(kind="none")))
    out.print(f"{args.vip}: no health check")
    return 0
