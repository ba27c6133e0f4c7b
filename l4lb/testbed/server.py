"""The backends' echo server and how the testbed runs it: one process per
backend (`python -m l4lb.testbed serve`, entered into the backend's
namespace), which prints 'ready' once it listens."""
from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .common import SERVICE_PORT, TIMEOUT, TestbedError

REPO = Path(__file__).resolve().parents[2]


def start(b, udp_addresses: list[str], log_path: Path) -> subprocess.Popen:
    """Starts the server of backend b (a hosts.Backend) in its namespace; its
    stderr goes to log_path, its stdout says when it is ready (wait_ready)."""
    cmd = b.nsenter() + [sys.executable, "-m", "l4lb.testbed", "serve", "--name", b.role,
                         "--port", str(SERVICE_PORT), *udp_addresses]
    with open(log_path, "w") as err:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, cwd=str(REPO))


def wait_ready(b, log_path: Path) -> None:
    """Waits until the server that start() started for b says 'ready'."""
    deadline = time.monotonic() + TIMEOUT
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        r, _, _ = select.select([b.server.stdout], [], [], max(left, 0))
        if not r:
            raise TestbedError(f"the server in {b.ns} did not start within {TIMEOUT:.0f} s")
        chunk = os.read(b.server.stdout.fileno(), 256)
        if not chunk:
            err = log_path.read_text(errors="replace")
            raise TestbedError(f"the server in {b.ns} exited: {err.strip()[-2000:]}")
        line += chunk
    if not line.startswith(b"ready"):
        raise TestbedError(f"the server in {b.ns} said {line!r}")


def serve(name: str, port: int, udp_addresses: list[str]) -> None:
    """Answers every line on a TCP connection with '<name> <line>', and every
    UDP datagram with '<name> <datagram>'. TCP listens on every address (a
    connection's replies leave from the address it came to, the VIP); UDP
    binds each VIP address, so that replies leave from the VIP (DSR)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(name.encode() + b" " + line)
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, addr):
            self.transport.sendto(name.encode() + b" " + data, addr)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(s, stop.set)
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::", port))
        server = await asyncio.start_server(handle, sock=sock, backlog=1024, limit=1 << 20)
        for a in udp_addresses:
            await loop.create_datagram_endpoint(Echo, local_addr=(a, port))
        print("ready", flush=True)
        await stop.wait()
        server.close()

    asyncio.run(main())
