"""A backend container: takes the LB's IP-in-IP packets and answers with its name.

There is no ipip device here (and often no ipip module on the host), so the
XDP decap program (xdp/decap.c) strips the outer header of packets to this
host's own addresses on the data interface; the inner packet, addressed to a
VIP, goes up the stack, where the VIPs on the loopback device take it. The
answer goes straight back to the client (DSR). Then an HTTP/1.1 server with
keep-alive answers every GET with BACKEND_NAME (a POST with the name and
the number of bytes it received).

Environment: L4LB_VIPS (comma-separated VIP addresses or prefixes, put on lo),
BACKEND_NAME (default: the hostname), L4LB_PORT (default 80),
L4LB_DECAP_MODE (native, generic or auto; default auto)."""
from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from l4lb import decap
from l4lb.errors import BpfError

NAME = os.environ.get("BACKEND_NAME", "").strip() or socket.gethostname()


def say(msg: str) -> None:
    print(f"l4lb-backend {NAME}: {msg}", flush=True)


def ip(*args: str) -> str:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"l4lb-backend: ip {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def vips_on_loopback() -> list[str]:
    done = []
    for item in os.environ.get("L4LB_VIPS", "").split(","):
        if not item.strip():
            continue
        net = ipaddress.ip_interface(item.strip())
        ip("addr", "replace", str(net), "dev", "lo")
        done.append(str(net))
    return done


def data_interfaces() -> dict[str, list[str]]:
    """Every interface but lo, with its addresses (the tunnel endpoints)."""
    out = {}
    for link in json.loads(ip("-j", "addr", "show")):
        if link["ifname"] == "lo":
            continue
        addrs = [a["local"] for a in link.get("addr_info", []) if a.get("scope") == "global"]
        if addrs:
            out[link["ifname"]] = addrs
    return out


def attach_decap(ifaces: dict[str, list[str]]):
    """The decap program with every data interface's addresses as tunnel
    endpoints, attached to each of those interfaces (the one program serves
    them all; it stays attached for the life of the container)."""
    prog = decap.load([a for addrs in ifaces.values() for a in addrs])
    mode = os.environ.get("L4LB_DECAP_MODE", "auto").strip() or "auto"
    for ifname, addrs in ifaces.items():
        try:
            got = prog.attach(ifname, mode)
        except BpfError as e:
            raise SystemExit(f"l4lb-backend: cannot attach the decap program to {ifname}: {e}") from e
        say(f"decap program on {ifname} ({got}), tunnel endpoints {', '.join(addrs)}")
        rp = open(f"/proc/sys/net/ipv4/conf/{ifname}/rp_filter").read().strip()
        if rp == "1":
            say(f"warning: rp_filter is strict on {ifname}; decapsulated packets may be dropped")
    return prog


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "l4lb-backend"

    def do_GET(self):
        body = f"{NAME}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Backend", NAME)
        self.send_header("X-Client", f"{self.client_address[0]}:{self.client_address[1]}")
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def do_POST(self):
        """Reads the body and answers with the name and the bytes received
        (for uploads through the LB)."""
        left, got = int(self.headers.get("Content-Length") or 0), 0
        while left > 0:
            chunk = self.rfile.read(min(left, 65536))
            if not chunk:
                break
            got += len(chunk)
            left -= len(chunk)
        body = f"{NAME} {got}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Backend", NAME)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        if os.environ.get("L4LB_LOG_REQUESTS"):
            say(f"{self.client_address[0]}:{self.client_address[1]} {fmt % args}")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


def main() -> int:
    if subprocess.run(["l4lb-node-prep"]).returncode:
        return 1
    vips = vips_on_loopback()
    prog = attach_decap(data_interfaces())  # noqa: F841 (kept for the life of the process)
    port = int(os.environ.get("L4LB_PORT", "80"))
    srv = Server(("0.0.0.0", port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    say(f"VIPs on lo: {', '.join(vips) or 'none'}; answering on port {port}")
    try:
        srv.serve_forever()
    finally:
        srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
