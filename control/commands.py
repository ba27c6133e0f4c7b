"""Argument parsing and dispatch for the `l4lb` command."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

from l4lb.errors import L4lbError

EPILOG = """examples:
  l4lb run --interface eth0 --config lb.yaml
  l4lb vip add 198.18.10.10:80/tcp --backend 198.18.2.1 --backend 198.18.2.2=2
  l4lb backend drain 198.18.10.10:80/tcp 198.18.2.1
  l4lb stats --watch
  l4lb health --watch 198.18.10.10:80/tcp
  l4lb apply -f lb.yaml
  l4lb lookup 198.18.0.5:40000 198.18.10.10:80 tcp
  l4lb run --interface eth0 --announce          # a fleet node: VIPs as routes for BIRD
  l4lb apply -f lb.yaml --server A --server B   # one configuration, many nodes
  l4lb capture --vip 198.18.10.10:80/tcp --count 100 -w out.pcapng
  l4lb replay --config lb.yaml --in in.pcap --out out.pcap
"""


MAX_MESSAGE = 300  # characters of an error message; argparse's echo whole arguments


def one_line(message: str) -> str:
    text = " ".join(message.split())
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + "…"


class Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one line, exit 2
        print(f"l4lb: error: {one_line(message)} (see: {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="l4lb", description="XDP layer-4 load balancer", epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    for _name, add in verbs_table():
        add(sub)
    return p


def verbs_table():
    """Every verb of the `l4lb` command, in the order `l4lb --help` lists them;
    each module adds its own arguments."""
    from . import demo, fleet_cli, health_cli, lab, verbs  # noqa: PLC0415

    return (
        ("run", verbs.add_run),
        ("vip", verbs.add_vip),
        ("backend", verbs.add_backend),
        ("stats", verbs.add_stats),
        ("status", verbs.add_status),
        ("apply", verbs.add_apply),
        ("lookup", verbs.add_lookup),
        ("flows", verbs.add_flows),
        ("capture", verbs.add_capture),
        ("health", lambda sub: health_cli.add_parser(sub, verbs.add_connection, verbs.client)),
        ("gateway", verbs.add_gateway),
        ("node", lambda sub: fleet_cli.add_node(sub, verbs.add_connection, verbs.client)),
        ("bird-config", fleet_cli.add_bird_config),
        ("replay", add_replay),
        ("demo", demo.add_parser),
        ("lab", lab.add_parser),
    )


def add_replay(sub) -> None:
    r = sub.add_parser("replay", help="run a pcap through the program with a configuration (nothing is attached)",
                       epilog="example:\n  l4lb replay --config lb.yaml --in in.pcap --out out.pcap",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--config", required=True, type=Path, help="YAML configuration (see README.md)")
    r.add_argument("--in", dest="pcap_in", required=True, type=Path, help="input pcap (Ethernet)")
    r.add_argument("--out", dest="pcap_out", type=Path, help="output pcap of TX and PASS frames")
    r.add_argument("--quiet", action="store_true", help="print the summary only")
    r.set_defaults(func=cmd_replay)


def cmd_replay(args) -> int:
    from l4lb.config import load_config  # noqa: PLC0415
    from l4lb.replay import replay  # noqa: PLC0415

    cfg = load_config(args.config)
    res = replay(cfg, args.pcap_in, args.pcap_out, on_line=(lambda _l: None) if args.quiet else print)
    total = sum(res.verdicts.values())
    print(f"{total} packets: " + ", ".join(f"{v} {n}" for v, n in sorted(res.verdicts.items())))
    moved = {k: v for k, v in res.counters.items() if v}
    print("counters: " + (", ".join(f"{k}={v}" for k, v in moved.items()) or "none"))
    if args.pcap_out:
        print(f"wrote {res.written} frames to {args.pcap_out}")
    return 0


def main(argv: list[str]) -> int:
    from .health_cli import default_verb  # noqa: PLC0415

    args = build_parser().parse_args(default_verb(argv))
    try:
        return args.func(args)
    except L4lbError as e:
        print(f"l4lb: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        print(f"l4lb: {e.code().name}: {one_line(e.details() or '')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
