"""The testbed's end hosts. A Client (198.18.0.0/24, fd00:198:18::/64) opens
TCP connections (Conn), UDP flows (UdpFlow) and pings; a Backend
(198.18.2.0/24, fd00:198:18:2::/64) holds every VIP on its loopback,
decapsulates (tunnels.py), runs the echo server (server.py) and answers
straight to the client (DSR), and counts what it decapsulated."""
from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import subprocess
import time
from dataclasses import dataclass

from .. import bpf, consts
from .common import NET4, NET6, SERVICE_PORT, TestbedError, family, hostport
from .namespaces import Node
from .packets import inet_checksum
from .tunnels import TUNNEL4, TUNNEL6


@dataclass
class _Flow:
    """A client's connected socket and the addresses and ports of its flow."""

    sock: socket.socket
    client: str
    src: str
    sport: int
    dst: str
    dport: int

    def endpoints(self) -> str:
        return f"{self.client} {hostport(self.src, self.sport)} -> {hostport(self.dst, self.dport)}"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@dataclass
class Conn(_Flow):
    """A TCP connection from a client to an address (a VIP, usually). Every
    ask() sends one line and reads the server's answer: its name, then the line."""

    backend: str = ""

    def ask(self, text: str = "hello", timeout: float = 5.0) -> str:
        """Sends text, returns the name of the backend that answered."""
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(text.encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise TestbedError(f"{self}: the server closed the connection")
                buf += chunk
        except OSError as e:
            raise TestbedError(f"{self}: {e}") from e
        name, _, echo = buf.decode().rstrip("\n").partition(" ")
        if echo != text:
            raise TestbedError(f"{self}: the answer does not echo what was sent ({len(echo)} of {len(text)} bytes)")
        self.backend = self.backend or name
        return name

    def __str__(self) -> str:
        return f"tcp {self.endpoints()}"


@dataclass
class UdpFlow(_Flow):
    """A UDP flow (one source port) from a client."""

    def ask(self, text: str = "hello", timeout: float = 2.0) -> str:
        self.sock.settimeout(timeout)
        try:
            self.sock.send(text.encode())
            data = self.sock.recv(65536)
        except OSError as e:
            raise TestbedError(f"udp {self.endpoints()}: {e}") from e
        name, _, echo = data.decode().partition(" ")
        if echo != text:
            raise TestbedError(f"udp answer {data[:40]!r} does not echo {text!r}")
        return name


class Client(Node):
    def __init__(self, role: str, ns: str, host: int):
        super().__init__(role, ns)
        self.addr4 = f"{NET4['clients']}.{host}"
        self.addr6 = f"{NET6['clients']}::{host}"

    def connect(self, address: str, port: int = SERVICE_PORT, timeout: float = 5.0) -> Conn:
        sock = self.socket(family(address), socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
        except OSError as e:
            sock.close()
            raise TestbedError(f"tcp {self.role} -> {hostport(address, port)}: {e}") from e
        src, sport = sock.getsockname()[:2]
        return Conn(sock, self.role, src, sport, address, port)

    def udp(self, address: str, port: int = SERVICE_PORT) -> UdpFlow:
        sock = self.socket(family(address), socket.SOCK_DGRAM)
        sock.connect((address, port))
        src, sport = sock.getsockname()[:2]
        return UdpFlow(sock, self.role, src, sport, address, port)

    def ping(self, address: str, timeout: float = 2.0) -> dict | None:
        """One ICMP echo; returns {'src', 'ttl'?, 'checksum_ok'} of the reply, or None."""
        v6 = family(address) == socket.AF_INET6
        sock = self.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                           socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
        ident, payload = os.getpid() & 0xFFFF, os.urandom(16)
        msg = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, ident, 1) + payload
        if not v6:  # the kernel computes ICMPv6 checksums itself
            msg = msg[:2] + struct.pack("!H", inet_checksum(msg)) + msg[4:]
        deadline = time.monotonic() + timeout
        try:
            sock.sendto(msg, (address, 0))
            while (left := deadline - time.monotonic()) > 0:
                r, _, _ = select.select([sock], [], [], left)
                if not r:
                    break
                data, peer = sock.recvfrom(65536)
                icmp = data if v6 else data[(data[0] & 0x0F) * 4:]
                if len(icmp) < 8 or icmp[0] != (129 if v6 else 0):
                    continue
                if struct.unpack("!H", icmp[4:6])[0] != ident or icmp[8:] != payload:
                    continue
                return {"src": peer[0], "checksum_ok": v6 or inet_checksum(icmp) == 0}
        finally:
            sock.close()
        return None


class Backend(Node):
    def __init__(self, role: str, ns: str, host: int):
        super().__init__(role, ns)
        self.host = host
        self.addr4 = f"{NET4['backends']}.{host}"
        self.addr6 = f"{NET6['backends']}::{host}"
        self.decap: str = ""
        self.program = None  # the XDP decap program, in xdp mode
        self.server: subprocess.Popen | None = None
        self._base = {"decap4": 0, "decap6": 0}

    def decap_totals(self) -> dict[str, int]:
        """Packets decapsulated here since decapsulation was set up (the
        counters as they stand)."""
        if self.decap == "xdp":
            s = bpf.percpu_sum(self.program.table(consts.MAP_DECAP_STATS))
            return {"decap4": s["decap4"], "decap6": s["decap6"]}
        return {"decap4": self.link_stats(TUNNEL4)["rx_packets"], "decap6": self.link_stats(TUNNEL6)["rx_packets"]}

    def gue_total(self) -> int | None:
        """GUE packets the decap program took since it was set up (xdp mode;
        None with tunnel devices, which count no GUE apart)."""
        if self.decap != "xdp":
            return None
        return bpf.percpu_sum(self.program.table(consts.MAP_DECAP_STATS))["gue"]

    def decap_counts(self) -> dict[str, int]:
        """Packets decapsulated here since the testbed was built: decap4 (outer
        IPv4: 4in4) and decap6 (outer IPv6: 6in6 and 4in6), from the decap
        program's counters or the tunnel devices' rx_packets."""
        raw = self.decap_totals()
        return {k: raw[k] - self._base[k] for k in raw}

    def zero_decap_counts(self) -> None:
        """decap_counts() counts from now on."""
        self._base = self.decap_totals()
