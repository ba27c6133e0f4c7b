"""Traffic that runs while LB nodes leave and come back: long-lived TCP
connections that check every exchange in both directions (a numbered line
out, its echo back, always from the same backend) and sequence-numbered UDP
streams whose unanswered datagrams are timed (the failover window)."""
from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from .common import SERVICE_PORT as PORT
from .common import TestbedError

@dataclass
class TcpLoop:
    """A connection that exchanges a numbered line every `period` seconds and
    checks the echo (both directions) and that the same backend answers."""

    conn: object
    backend: str = ""
    exchanges: int = 0
    error: str = ""


@dataclass
class UdpStream:
    sock: socket.socket
    src: str
    sport: int
    sent: dict = field(default_factory=dict)  # seq -> send time
    got: set = field(default_factory=set)
    backends: set = field(default_factory=set)


class Traffic:
    """TCP connections and UDP streams from every client to one VIP pair,
    running in threads until stop()."""

    def __init__(self, fleet, tcp_per_client: int = 8, udp_per_client: int = 4,
                 tcp_period: float = 0.05, udp_period: float = 0.005):
        self.fleet = fleet
        self.tcp: list[TcpLoop] = []
        self.udp: list[UdpStream] = []
        self.tcp_period, self.udp_period = tcp_period, udp_period
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        for c in fleet.clients:
            for i in range(tcp_per_client):
                vip = fleet.vip4(0) if i % 2 == 0 else fleet.vip6(0)
                conn = c.connect(vip, PORT)
                name = conn.ask("0")
                self.tcp.append(TcpLoop(conn, name))
            for i in range(udp_per_client):
                vip = fleet.vip4(0) if i % 2 == 0 else fleet.vip6(0)
                s = c.socket(socket.AF_INET6 if ":" in vip else socket.AF_INET, socket.SOCK_DGRAM)
                s.connect((vip, PORT))
                s.settimeout(0.2)
                src, sport = s.getsockname()[:2]
                self.udp.append(UdpStream(s, src, sport))

    def start(self) -> None:
        for t in self.tcp:
            self.threads.append(threading.Thread(target=self._tcp_loop, args=(t,), daemon=True))
        for u in self.udp:
            self.threads.append(threading.Thread(target=self._udp_send, args=(u,), daemon=True))
            self.threads.append(threading.Thread(target=self._udp_recv, args=(u,), daemon=True))
        for t in self.threads:
            t.start()

    def _tcp_loop(self, t: TcpLoop) -> None:
        n = 0
        while not self.stopping.is_set() and not t.error:
            n += 1
            try:
                name = t.conn.ask(f"{n} " + "x" * (n % 200), timeout=10.0)
            except TestbedError as e:
                t.error = str(e)
                return
            if name != t.backend:
                t.error = f"{t.conn}: answered by {name}, before by {t.backend}"
                return
            t.exchanges += 1
            self.stopping.wait(self.tcp_period)

    def _udp_send(self, u: UdpStream) -> None:
        seq = 0
        next_at = time.monotonic()
        while not self.stopping.is_set():
            seq += 1
            u.sent[seq] = time.monotonic()
            try:
                u.sock.send(struct.pack("!Q", seq).hex().encode())
            except OSError:
                pass
            next_at += self.udp_period
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def _udp_recv(self, u: UdpStream) -> None:
        while not self.stopping.is_set():
            try:
                data = u.sock.recv(2048)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                if self.stopping.is_set():
                    return
                continue
            name, _, text = data.decode(errors="replace").partition(" ")
            try:
                u.got.add(struct.unpack("!Q", bytes.fromhex(text))[0])
            except ValueError:
                continue
            u.backends.add(name)

    def stop(self) -> None:
        time.sleep(0.5)  # the last datagrams' answers
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=15)
        for t in self.tcp:
            t.conn.close()
        for u in self.udp:
            u.sock.close()

    # -- results
    def broken(self) -> list[str]:
        return [t.error for t in self.tcp if t.error]

    def lost(self) -> list[float]:
        """Send times of the datagrams that got no answer (but the last 0.3 s)."""
        out = []
        for u in self.udp:
            last = max(u.sent.values()) - 0.3 if u.sent else 0
            out += [at for seq, at in u.sent.items() if seq not in u.got and at < last]
        return sorted(out)

    def gaps(self) -> list[float]:
        """Per stream, the longest run of unanswered datagrams, in seconds."""
        out = []
        for u in self.udp:
            longest, start, prev = 0.0, None, None
            for seq in sorted(u.sent):
                at = u.sent[seq]
                if seq not in u.got:
                    start = at if start is None else start
                    prev = at
                elif start is not None:
                    longest = max(longest, prev - start + self.udp_period)
                    start = None
            out.append(longest)
        return out
