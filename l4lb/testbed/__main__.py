"""`python -m l4lb.testbed`: the backends' echo server (what the testbed runs
in each backend namespace), a question to it (`ask`, from a client
namespace of `l4lb lab`), and removal of what interrupted testbeds left."""
from __future__ import annotations

import argparse
import socket
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
    a = sub.add_parser("ask", help="send a line to ADDRESS (a VIP) and print who answered")
    a.add_argument("address")
    a.add_argument("--port", type=int, default=SERVICE_PORT)
    a.add_argument("--udp", action="store_true")
    a.add_argument("--text", default="hello")
    sub.add_parser("sweep", help="remove what interrupted testbeds left behind")
    args = p.parse_args(argv)
    if args.cmd == "serve":
        serve(args.name, args.port, args.udp_addresses)
    elif args.cmd == "ask":
        return ask(args.address, args.port, args.udp, args.text)
    else:
        for what in sweep() or ["nothing to remove"]:
            print(what)
    return 0


def ask(address: str, port: int, udp: bool, text: str) -> int:
    fam = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM) as s:
        s.settimeout(3)
        try:
            s.connect((address, port))
            s.sendall(text.encode() + (b"" if udp else b"\n"))
            data = s.recv(65536)
        except OSError as e:
            print(f"{address}:{port}: {e}", file=sys.stderr)
            return 1
    print(data.decode(errors="replace").strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
