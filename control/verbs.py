"""The `l4lb` verbs: `run` starts the server; the others are gRPC calls."""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import grpc
from rich.console import Console
from rich.table import Table

from l4lb import consts
from l4lb.announce import DEFAULT_TABLE
from l4lb.errors import ValidationError, shown
from l4lb.model import parse_decimal, parse_port

from .client import Client, parse_backend, parse_vip, vip_text
from .l4lb.v1 import l4lb_pb2 as pb
from .server import DEFAULT_SOCKET, INSECURE_FLAG

out = Console(markup=False, highlight=False)
MAX_FLOWS_SHOWN = 100000  # ListFlows' own bound


def whole_number(text: str) -> int:
    """argparse type: a whole number in ASCII digits (int() takes any script's digits)."""
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise ValueError(text)
    return int(text)


_SECONDS_RE = re.compile(r"^(?:[0-9]{1,7}(?:\.[0-9]*)?|\.[0-9]+)$")


def seconds(text: str) -> float:
    """argparse type: an interval of 0.1-3600 seconds in ASCII digits (float()
    takes 'nan', 'inf' and any script's digits)."""
    if not _SECONDS_RE.match(text) or not 0.1 <= float(text) <= 3600:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a number of seconds from 0.1 to 3600")
    return float(text)


def client(args) -> Client:
    """A client for the connection options of args."""
    return Client(args.server, tls_ca=args.tls_ca, cert=args.tls_cert_client, key=args.tls_key_client)


def add_connection(p, many: bool = False):
    """The connection options every gRPC verb takes; with many, --server repeats (one call per node)."""
    if many:
        p.add_argument("--server", action="append", default=None,
                       help=f"gRPC address, repeatable: every node of a fleet (default {DEFAULT_SOCKET})")
    else:
        p.add_argument("--server", default=DEFAULT_SOCKET, help=f"gRPC address (default {DEFAULT_SOCKET})")
    p.add_argument("--tls-ca", help="CA certificate to verify a TLS server")
    p.add_argument("--tls-cert-client", help="client certificate (when the server asks for one)")
    p.add_argument("--tls-key-client", help="client key")


def servers(args) -> list[str]:
    """The --server addresses of a verb that takes several; a single one becomes args.server."""
    many = args.server or [DEFAULT_SOCKET]
    if len(set(many)) != len(many):
        raise ValidationError("--server: an address is given twice")
    args.server = many[0]
    return many


def client_for(args):
    """Makes a client for one address with the TLS options of args."""
    return lambda address: Client(address, tls_ca=args.tls_ca, cert=args.tls_cert_client, key=args.tls_key_client)


def add_run(sub) -> None:
    r = sub.add_parser("run", help="load and attach the program, serve gRPC")
    r.add_argument("--interface", required=True, action="append",
                   help="the LB's NIC; repeat it for several (one program and one set of maps on all; "
                        "the first names the pinned maps and the state)")
    r.add_argument("--next-hop", choices=sorted(consts.NEXT_HOPS),
                   help="where encapsulated packets go: gateway (the gateway MAC, XDP_TX) or fib (the "
                        "kernel's routes and neighbours per packet; needs forwarding on); default: the "
                        "configuration's next_hop, else the saved state's, else gateway")
    r.add_argument("--config", help="YAML configuration applied at start")
    r.add_argument("--listen", default=DEFAULT_SOCKET,
                   help="unix:PATH, or HOST:PORT with mutual TLS (--tls-cert, --tls-key, --tls-client-ca)")
    r.add_argument("--group", help="group of the unix socket (mode 0660)")
    r.add_argument("--tls-cert", help="the server's certificate (PEM)")
    r.add_argument("--tls-key", help="the server's key (PEM)")
    r.add_argument("--tls-client-ca", help="CA that signs the clients' certificates (required on TCP)")
    r.add_argument(INSECURE_FLAG, action="store_true",
                   help="serve TCP without client authentication: on loopback without TLS, or TLS without "
                        "--tls-client-ca (a warning is logged; any local user or any client can change the LB)")
    r.add_argument("--metrics-listen", metavar="ADDRESS:PORT",
                   help="serve Prometheus metrics at http://ADDRESS:PORT/metrics (off by default; "
                        "loopback only unless --metrics-allow-remote), e.g. 127.0.0.1:9750")
    r.add_argument("--metrics-allow-remote", action="store_true",
                   help="let --metrics-listen take a non-loopback address (the metrics name every VIP and backend)")
    r.add_argument("--metrics-max-pairs", type=whole_number,
                   help="(VIP, backend) listings exported with their own weight and health gauges (default 20000)")
    r.add_argument("--attach-mode", default="auto", choices=["auto", "native", "generic"])
    r.add_argument("--detach", action="store_true", help="detach and remove pinned maps on exit")
    r.add_argument("--force", action="store_true", help="replace an XDP program that is not l4lb's")
    r.add_argument("--state-dir", default=consts.STATE_ROOT)
    r.add_argument("--announce", nargs="?", const=str(DEFAULT_TABLE), metavar="TABLE",
                   help="announce live VIPs as host routes in this kernel routing table, for the node's "
                        f"routing daemon to export (default table {DEFAULT_TABLE}; see l4lb bird-config)")
    r.add_argument("--max-vips", type=whole_number, default=consts.DEFAULT_MAX_VIPS)
    r.add_argument("--max-backends", type=whole_number, default=consts.DEFAULT_MAX_BACKENDS)
    r.add_argument("--ct-size", type=whole_number, default=consts.DEFAULT_CT_SIZE)
    r.add_argument("--ring-size", type=whole_number, default=consts.DEFAULT_RING_SIZE, choices=consts.ALLOWED_RING_SIZES)
    r.set_defaults(func=cmd_run)


def add_vip(sub) -> None:
    vip = sub.add_parser("vip", help="add, delete, list and show VIPs").add_subparsers(dest="verb", required=True)
    a = vip.add_parser("add", help="add a VIP")
    a.add_argument("vip", help="ADDRESS[:PORT]/PROTOCOL")
    a.add_argument("--backend", action="append", default=[], help="ADDRESS[=WEIGHT], repeatable")
    a.add_argument("--flag", action="append", default=[], choices=sorted(consts.VIP_FLAGS))
    a.add_argument("--encap", default=consts.DEFAULT_ENCAP, choices=sorted(consts.ENCAPS),
                   help="how packets reach the backends: IP-in-IP (default) or GUE, to the node-wide "
                        f"gue_port (default {consts.DEFAULT_GUE_PORT})")
    a.set_defaults(func=cmd_vip_add)
    e = vip.add_parser("encap", help="change a VIP's encapsulation (its established flows follow at once)")
    e.add_argument("vip")
    e.add_argument("encap", choices=sorted(consts.ENCAPS))
    e.set_defaults(func=cmd_vip_encap)
    d = vip.add_parser("del", help="delete a VIP")
    d.add_argument("vip")
    d.set_defaults(func=cmd_vip_del)
    vip.add_parser("list", help="list VIPs").set_defaults(func=cmd_vip_list)
    s = vip.add_parser("show", help="a VIP with its backends and counters")
    s.add_argument("vip")
    s.set_defaults(func=cmd_vip_show)
    for p in (a, e, d, s) + tuple(vip.choices[n] for n in ("list",)):
        add_connection(p)


def add_backend(sub) -> None:
    be = sub.add_parser("backend", help="change a VIP's backends").add_subparsers(dest="verb", required=True)
    for name, fn, hlp in (("add", cmd_backend_add, "ADDRESS[=WEIGHT] ..."), ("del", cmd_backend_del, "ADDRESS ..."),
                          ("weight", cmd_backend_weight, "ADDRESS=WEIGHT ..."), ("drain", cmd_backend_drain, "ADDRESS ...")):
        p = be.add_parser(name, help=f"{name} backends of a VIP")
        p.add_argument("vip")
        p.add_argument("backends", nargs="+", help=hlp)
        p.set_defaults(func=fn)
        add_connection(p)


def add_stats(sub) -> None:
    st = sub.add_parser("stats", help="counters")
    st.add_argument("vip", nargs="?")
    st.add_argument("--watch", action="store_true",
                    help="a live view of rates (packets/s, bytes/s, new flows/s) per VIP and per backend")
    st.add_argument("--interval", type=seconds, default=1.0, help="seconds between updates (0.1-3600)")
    st.set_defaults(func=cmd_stats)
    add_connection(st)


def add_capture(sub) -> None:
    c = sub.add_parser("capture", help="copy packets at the XDP hook into a pcapng file",
                       epilog="examples:\n  l4lb capture --vip 198.18.10.10:80/tcp --count 100 -w out.pcapng\n"
                              "  l4lb capture --verdict drop --duration 10 -w drops.pcapng\n"
                              "  l4lb capture --backend 198.18.2.1 --snaplen 128 -w b1.pcapng\n"
                              "a forwarded packet is written twice, as received and as sent; each packet's "
                              "comment says which, the verdict, the VIP and the backend",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--vip", help="only this VIP's packets (ADDRESS[:PORT]/PROTOCOL)")
    c.add_argument("--backend", help="only packets to this backend")
    c.add_argument("--verdict", action="append", choices=["tx", "pass", "drop"],
                   help="only packets with this verdict (repeatable; default: all)")
    c.add_argument("--count", type=whole_number, default=0, help="stop after N packets (0: no limit)")
    c.add_argument("--duration", type=seconds, help="stop after S seconds (0.1-3600)")
    c.add_argument("--snaplen", type=whole_number, default=0,
                   help=f"bytes of each frame (1-{consts.CAPTURE_SNAP_MAX}; default: all of it up to that)")
    c.add_argument("-w", dest="write", required=True, type=Path, help="the pcapng file to write")
    c.set_defaults(func=cmd_capture)
    add_connection(c)


def cmd_capture(args) -> int:
    from .pcapng import PcapngWriter, comment  # noqa: PLC0415

    if args.snaplen > consts.CAPTURE_SNAP_MAX:
        raise ValidationError(f"--snaplen {args.snaplen}: at most {consts.CAPTURE_SNAP_MAX}")
    req = pb.CaptureRequest(backend=args.backend or "", verdicts=args.verdict or [], count=args.count,
                            duration_seconds=args.duration or 0, snaplen=args.snaplen)
    if args.vip:
        req.vip.CopyFrom(parse_vip(args.vip))
    copies, last = 0, pb.CapturedPacket()
    try:
        f = open(args.write, "wb")
    except OSError as e:
        raise ValidationError(f"-w {shown(str(args.write))}: {e.strerror}") from None
    with f, client(args) as c:
        w = PcapngWriter(f, args.snaplen or consts.CAPTURE_SNAP_MAX)
        stream = c.stub.Capture(req)
        try:
            for m in stream:
                last = m
                if m.end:
                    break
                vip = vip_text(m.vip) if m.HasField("vip") else ""
                w.write(m.timestamp_ns, m.data, m.length, comment(m.sent, m.verdict, vip, m.backend, m.cpu, m.seq))
                copies += 1
        except KeyboardInterrupt:
            stream.cancel()
    print(f"l4lb: {last.packets} packets ({copies} copies) written to {args.write}; {last.lost} copies lost "
          "(the ring was full)" if last.lost else
          f"l4lb: {last.packets} packets ({copies} copies) written to {args.write}", file=sys.stderr)
    return 0


def add_status(sub) -> None:
    ss = sub.add_parser("status", help="interface, program, capacity; with several --server, whether the "
                                       "nodes hold identical tables")
    ss.set_defaults(func=cmd_status)
    add_connection(ss, many=True)


def add_apply(sub) -> None:
    ap = sub.add_parser("apply", help="make the running state equal a configuration file")
    ap.add_argument("-f", dest="file", required=True)
    ap.add_argument("--dry-run", action="store_true", help="validate and list the changes, change nothing")
    ap.set_defaults(func=cmd_apply)
    add_connection(ap, many=True)


def add_lookup(sub) -> None:
    lk = sub.add_parser("lookup", help="which backend the live program picks for a flow")
    lk.add_argument("src", help="ADDRESS:PORT ([v6]:port for IPv6)")
    lk.add_argument("dst")
    lk.add_argument("protocol", choices=sorted(consts.PROTOCOLS))
    lk.set_defaults(func=cmd_lookup)
    add_connection(lk)


def add_flows(sub) -> None:
    fl = sub.add_parser("flows", help="connection-table entries of a VIP").add_subparsers(dest="verb", required=True)
    fs = fl.add_parser("show", help="list a VIP's entries")
    fs.add_argument("vip")
    fs.add_argument("--limit", default="100", help=f"at most this many entries (1-{MAX_FLOWS_SHOWN})")
    fs.set_defaults(func=cmd_flows_show)
    ff = fl.add_parser("flush", help="delete a VIP's entries (their next packets re-pick)")
    ff.add_argument("vip")
    ff.set_defaults(func=cmd_flows_flush)
    add_connection(fs), add_connection(ff)


def add_gateway(sub) -> None:
    gw = sub.add_parser("gateway", help="show or set the gateway")
    gw.add_argument("mac", nargs="?", help="MAC to set")
    gw.add_argument("--ip", help="resolve the MAC of this neighbour")
    gw.set_defaults(func=cmd_gateway)
    add_connection(gw)


def cmd_run(args) -> int:
    from .runner import run  # noqa: PLC0415

    return run(args)


def _print_vip(v: pb.Vip, counters: bool = False) -> None:
    t = Table(title=f"{vip_text(v.id)}  flags: {', '.join(v.flags) or '-'}  encap: {v.encap or 'ipip'}")
    t.add_column("backend"), t.add_column("weight", justify="right")
    if counters:
        for col in ("packets", "bytes", "new flows"):
            t.add_column(col, justify="right")
    for b in v.backends:
        row = [b.address, str(b.weight) + ("  (draining)" if b.weight == 0 else "")]
        t.add_row(*row, *((str(b.packets), str(b.bytes), str(b.new_flows)) if counters else ()))
    out.print(t)
    if counters:
        out.print(f"packets {v.packets}  bytes {v.bytes}  new flows {v.new_flows}")
        out.print("backend counters are the backend's own: a backend on several VIPs counts them all")


def cmd_vip_add(args) -> int:
    req = pb.AddVipRequest(id=parse_vip(args.vip), flags=args.flag, backends=[parse_backend(b) for b in args.backend],
                           encap=args.encap)
    with client(args) as c:
        _print_vip(c.call("AddVip", req))
    return 0


def cmd_vip_encap(args) -> int:
    vid = parse_vip(args.vip)
    with client(args) as c:
        flags = list(c.call("GetVip", pb.GetVipRequest(id=vid)).flags)  # ModifyVip takes the whole set
        _print_vip(c.call("ModifyVip", pb.ModifyVipRequest(id=vid, flags=flags, encap=args.encap)))
    return 0


def cmd_vip_del(args) -> int:
    with client(args) as c:
        c.call("DeleteVip", pb.DeleteVipRequest(id=parse_vip(args.vip)))
    out.print(f"deleted {args.vip}")
    return 0


def cmd_vip_list(args) -> int:
    with client(args) as c:
        vips = c.call("ListVips", pb.ListVipsRequest()).vips
    t = Table(title="VIPs")
    for col in ("vip", "flags", "encap", "backends", "draining"):
        t.add_column(col)
    for v in vips:
        t.add_row(vip_text(v.id), ",".join(v.flags) or "-", v.encap or "ipip", str(len(v.backends)),
                  str(sum(1 for b in v.backends if b.weight == 0)))
    out.print(t)
    return 0


def cmd_vip_show(args) -> int:
    with client(args) as c:
        _print_vip(c.call("GetVip", pb.GetVipRequest(id=parse_vip(args.vip))), counters=True)
    return 0


def _backend_call(args, rpc: str, req) -> int:
    with client(args) as c:
        _print_vip(c.call(rpc, req))
    return 0


def cmd_backend_add(args) -> int:
    return _backend_call(args, "AddBackends", pb.AddBackendsRequest(
        id=parse_vip(args.vip), backends=[parse_backend(b) for b in args.backends]))


def cmd_backend_del(args) -> int:
    return _backend_call(args, "RemoveBackends", pb.RemoveBackendsRequest(id=parse_vip(args.vip), addresses=args.backends))


def cmd_backend_weight(args) -> int:
    bs = []
    for b in args.backends:
        if "=" not in b:
            raise ValidationError(f"backend {shown(b)}: write ADDRESS=WEIGHT")
        bs.append(parse_backend(b))
    return _backend_call(args, "SetBackendWeights", pb.SetBackendWeightsRequest(id=parse_vip(args.vip), backends=bs))


def cmd_backend_drain(args) -> int:
    return _backend_call(args, "SetBackendWeights", pb.SetBackendWeightsRequest(
        id=parse_vip(args.vip), backends=[pb.Backend(address=a, weight=0) for a in args.backends]))


def _print_stats(s: pb.Stats) -> None:
    t = Table(title="counters")
    t.add_column("counter"), t.add_column("value", justify="right")
    for k, v in s.counters.items():
        t.add_row(k, str(v))
    out.print(t)
    if s.vips:
        vt = Table(title="VIPs and their backends")
        for col in ("vip", "backend", "packets", "bytes", "new flows"):
            vt.add_column(col, justify="left" if col in ("vip", "backend") else "right")
        for v in s.vips:
            vt.add_row(vip_text(v.id), "", str(v.packets), str(v.bytes), str(v.new_flows))
            for b in v.backends:
                vt.add_row("", b.address, str(b.packets), str(b.bytes), str(b.new_flows))
        out.print(vt)


def _si(value: float, unit: str) -> str:
    """1234567 -> '1.23 M' + unit (rates in a live view)."""
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.1f} {unit}"


def _rates_view(prev: pb.Stats | None, s: pb.Stats, interval: float):
    """The live view of `stats --watch`: per VIP and per backend, packets/s,
    bytes/s and new flows/s between the last two messages; totals in the
    first one (no rate yet)."""
    from rich.console import Group  # noqa: PLC0415

    dt = s.timestamp - prev.timestamp if prev is not None else 0.0
    before: dict[tuple, tuple[int, int, int]] = {}
    if prev is not None:
        for v in prev.vips:
            before[(vip_text(v.id), "")] = (v.packets, v.bytes, v.new_flows)
            for b in v.backends:
                before[(vip_text(v.id), b.address)] = (b.packets, b.bytes, b.new_flows)

    def rate(key, now: tuple[int, int, int]) -> list[str]:
        was = before.get(key)
        if dt <= 0 or was is None or any(n < w for n, w in zip(now, was)):
            return ["-", "-", "-"]  # first sample, new row, or a VIP/backend that started over
        return [_si((n - w) / dt, u) for n, w, u in zip(now, was, ("pkt/s", "B/s", "flows/s"))]

    t = Table(title=f"{time.strftime('%H:%M:%S')}  rates over {dt:.1f} s" if dt > 0 else
              f"{time.strftime('%H:%M:%S')}  first sample: rates from the next one (every {interval:g} s)")
    for col in ("vip", "backend", "packets/s", "bytes/s", "new flows/s", "packets", "bytes"):
        t.add_column(col, justify="left" if col in ("vip", "backend") else "right")
    for v in s.vips:
        name = vip_text(v.id)
        now = (v.packets, v.bytes, v.new_flows)
        t.add_row(name, "", *rate((name, ""), now), str(v.packets), str(v.bytes), style="bold")
        for b in v.backends:
            now = (b.packets, b.bytes, b.new_flows)
            t.add_row("", b.address, *rate((name, b.address), now), str(b.packets), str(b.bytes))
    g = Table(title="data plane, per second")
    names = ("tx", "pass", "ct_insert", "no_backend", "malformed", "error")
    for n in names:
        g.add_column(n, justify="right")
    if prev is not None and dt > 0:
        g.add_row(*(_si(max(0, s.counters.get(n, 0) - prev.counters.get(n, 0)) / dt, "") for n in names))
    else:
        g.add_row(*("-" for _ in names))
    return Group(t, g)


def cmd_stats(args) -> int:
    req_id = parse_vip(args.vip) if args.vip else None
    if not args.watch:
        with client(args) as c:
            _print_stats(c.call("GetStats", pb.GetStatsRequest(id=req_id)))
        return 0
    return _watch_stats(args, pb.WatchStatsRequest(id=req_id, interval_seconds=args.interval))


RECONNECT_FIRST, RECONNECT_MAX = 0.5, 8.0  # seconds between attempts, doubling
_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)


def _watch_stats(args, req) -> int:
    """A live view of rates until Ctrl-C (follow() reconnects when the server restarts)."""
    from rich.live import Live  # noqa: PLC0415

    live = Live(console=out, auto_refresh=False, transient=False) if out.is_terminal else None
    prev: list = [None]

    def show(s: pb.Stats) -> None:
        view = _rates_view(prev[0], s, req.interval_seconds)
        prev[0] = s
        if live is not None:
            if not live.is_started:
                live.start()
            live.update(view, refresh=True)
        else:  # not a terminal: one view after another
            out.print(view)
    try:
        return follow(args, lambda c: c.stub.WatchStats(req), show)
    finally:
        if live is not None and live.is_started:
            live.stop()


def follow(args, open_call, on_message) -> int:
    """Follows a server stream (open_call(client) starts it) until Ctrl-C,
    on_message(message) for each message. When the server goes (a restart),
    says so once on stderr and reconnects, waiting longer between attempts up
    to RECONNECT_MAX; errors other than the server's absence end it."""
    wait, waiting = RECONNECT_FIRST, False
    while True:
        try:
            with client(args) as c:
                call = open_call(c)
                call.initial_metadata()  # the server took the call (or it failed: the loop below raises)
                if waiting and not call.done():
                    print("l4lb: reconnected", file=sys.stderr, flush=True)
                    wait, waiting = RECONNECT_FIRST, False
                for message in call:
                    if waiting:
                        print("l4lb: reconnected", file=sys.stderr, flush=True)
                        wait, waiting = RECONNECT_FIRST, False
                    on_message(message)
            reason = "the server ended the stream"
        except grpc.RpcError as e:
            if e.code() not in _GONE:
                raise
            reason = f"{e.code().name}: {e.details()}"
        if not waiting:
            print(f"l4lb: lost the server ({reason}); reconnecting to {args.server} until Ctrl-C",
                  file=sys.stderr, flush=True)
            waiting = True
        time.sleep(wait)
        wait = min(wait * 2, RECONNECT_MAX)


def cmd_status(args) -> int:
    many = servers(args)
    if len(many) > 1:
        from .fleet_cli import status_many  # noqa: PLC0415

        return status_many(many, client_for(args))
    with client(args) as c:
        s = c.call("GetStatus", pb.GetStatusRequest())
    t = Table(title="l4lb")
    t.add_column("what"), t.add_column("value")
    rows = [("interface" + ("s" if len(s.interfaces) > 1 else ""), ", ".join(s.interfaces) or s.interface),
            ("attach mode", s.attach_mode), ("program id", str(s.program_id)),
            ("next hop", s.next_hop + (" (kernel FIB, per packet)" if s.next_hop == "fib" else "")),
            ("VIPs", f"{s.vips} / {s.capacity.max_vips}"), ("backends", f"{s.backends} / {s.capacity.max_backends}"),
            ("connection table", f"{s.conntrack_used} / {s.capacity.conntrack_entries}"),
            ("ring size", str(s.capacity.ring_size)),
            ("kernel memory", f"{s.capacity.kernel_bytes / 2**20:.1f} MiB"), ("uptime", f"{s.uptime_seconds:.0f} s")]
    rows.append(("VIPs in panic", ", ".join(s.panic) or "none"))
    if s.announce_table:
        rows += [("announce table", str(s.announce_table)), ("drained", "yes" if s.drained else "no"),
                 ("announced", ", ".join(s.announced) or "none")]
    for r in rows:
        t.add_row(*r)
    out.print(t)
    return 0


def _hostport(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValidationError(f"{what} {shown(text)}: write ADDRESS:PORT ([ADDRESS]:PORT for IPv6)")
    return host.strip("[]"), parse_port(port, f"{what} {shown(text)}: port")


def cmd_lookup(args) -> int:
    (src, sport), (dst, dport) = _hostport(args.src, "source"), _hostport(args.dst, "destination")
    with client(args) as c:
        r = c.call("LookupFlow", pb.LookupFlowRequest(src=src, dst=dst, sport=sport, dport=dport, protocol=args.protocol))
    out.print(f"{r.verdict}" + (f" -> {r.backend}" if r.backend else ""))
    if r.vip:
        out.print(f"VIP {r.vip}, backend picked by {r.hashed_on}")
    return 0


def cmd_gateway(args) -> int:
    with client(args) as c:
        if args.mac or args.ip:
            req = pb.SetGatewayRequest(mac=args.mac) if args.mac else pb.SetGatewayRequest(ip=args.ip)
            g = c.call("SetGateway", req)
        else:
            g = c.call("GetGateway", pb.GetGatewayRequest())
    out.print(f"gateway {g.mac}" + (f" ({g.ip})" if g.ip else ""))
    return 0


def cmd_apply(args) -> int:
    """The file goes to the server whole and is applied as one change: every
    entry, the runtime settings included, or nothing."""
    from l4lb.config import load_config  # noqa: PLC0415

    many = servers(args)
    load_config(args.file)  # a bad file is named here, before any call
    if len(many) > 1:
        from .fleet_cli import apply_many  # noqa: PLC0415

        return apply_many(args, many, client_for(args))
    text = Path(args.file).read_text()
    with client(args) as c:
        r = c.call("Apply", pb.ApplyRequest(config_yaml=text, dry_run=args.dry_run))
    for line in r.changes:
        out.print(line)
    out.print(f"{len(r.changes)} change(s) {'would be applied' if args.dry_run else 'applied'}")
    return 0


def cmd_flows_show(args) -> int:
    limit = parse_decimal(args.limit, "--limit", f"1-{MAX_FLOWS_SHOWN}")
    if not 1 <= limit <= MAX_FLOWS_SHOWN:
        raise ValidationError(f"--limit: {limit} is out of range (1-{MAX_FLOWS_SHOWN})")
    with client(args) as c:
        r = c.call("ListFlows", pb.ListFlowsRequest(id=parse_vip(args.vip), limit=limit))
    t = Table(title=f"{args.vip}: {r.total} entries" + (f" (first {len(r.flows)})" if r.total > len(r.flows) else ""))
    for col in ("client", "vip", "backend"):
        t.add_column(col)
    for f in r.flows:
        t.add_row(f"{f.src}:{f.sport}", f"{f.dst}:{f.dport}/{f.protocol}", f.backend or "(stale: re-picks)")
    out.print(t)
    return 0


def cmd_flows_flush(args) -> int:
    with client(args) as c:
        r = c.call("FlushFlows", pb.FlushFlowsRequest(id=parse_vip(args.vip)))
    out.print(f"flushed {r.flushed} entries of {args.vip}")
    return 0
