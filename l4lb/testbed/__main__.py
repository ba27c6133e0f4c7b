"""`python -m l4lb.testbed`: the backends' echo server (what the testbed runs
in each backend namespace), and removal of what interrupted testbeds left."""
from __future__ import annotations

import argparse
import sys

from .common import SERVICE_PORT
from .namespaces import sweep
from .server import serve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m l4lb.testbed",
                                description="the testbed's backend server, and leftover removal")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="answer TCP lines and UDP datagrams with this name")
    s.add_argument("--name", required=True)
    s.add_argument("--port", type=int, default=SERVICE_PORT)
    s.add_argument("udp_addresses", nargs="*", help="addresses to bind for UDP (the VIPs)")
    sub.add_parser("sweep", help="remove what interrupted testbeds left behind")
    args = p.parse_args(argv)
    if args.cmd == "serve":
        serve(args.name, args.port, args.udp_addresses)
    else:
        for what in sweep() or ["nothing to remove"]:
            print(what)
    return 0


if __name__ == "__main__":
    sys.exit(main())
