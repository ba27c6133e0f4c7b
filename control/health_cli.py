"""`l4lb health`: each backend's health as the checks see it (`show`, with
`--watch`), and a VIP's check set or removed (`set`, `clear`)."""
from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from l4lb import health

from .client import Client, parse_vip, vip_text
from .l4lb.v1 import l4lb_pb2 as pb

out = Console(markup=False, highlight=False)


def add_parser(sub, conn, client) -> None:
    """conn(parser) adds the connection options; client(args) makes a Client."""
    h = sub.add_parser("health", help="backend health: show, set or clear a VIP's check").add_subparsers(
        dest="verb", required=True)
    s = h.add_parser("show", help="each backend's state, effective weight and last probe")
    s.add_argument("vip", nargs="?", help="ADDRESS[:PORT]/PROTOCOL (default: every VIP with a check)")
    s.add_argument("--watch", action="store_true", help="redraw every --interval seconds")
    s.add_argument("--interval", type=float, default=1.0)
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
    with client(args) as c:
        if not args.watch:
            out.print(_table(_vips(c, args)))
            return 0
        from rich.live import Live  # noqa: PLC0415

        with Live(_table(_vips(c, args)), console=out, refresh_per_second=4) as live:
            while True:
                time.sleep(max(0.1, args.interval))
                live.update(_table(_vips(c, args)))


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
