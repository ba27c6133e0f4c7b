"""Health probes: TCP connects and HTTP GETs to many targets from one asyncio
loop on one thread of its own, each target probed every `interval` seconds,
the targets' probes spread evenly over the interval rather than sent in
bursts. A target turns up after `rise` successes in a row and down after
`fall` failures in a row; on_transition is called once per such change.

A tunnel probe connects to the VIP itself with a socket mark that names the
backend (probe_mark(index)): the tc egress program (xdp/probe_encap.c) sends
its packets encapsulated to that backend, like client traffic. A direct probe
connects to the backend's own address with no mark. Setting a mark needs
CAP_NET_ADMIN.

Standard library only; no bcc, no netlink: the caller attaches the tc program."""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, replace
from typing import NamedTuple

from . import consts

log = logging.getLogger("l4lb.probe")

KINDS = ("tcp", "http")
STATES = ("up", "down", "unknown")
_LINGER_RST = struct.pack("ii", 1, 0)  # close with a RST: no TIME_WAIT per probe on the prober's side
_MAX_STATUS_LINE = 1024


def probe_mark(backend_index: int) -> int:
    """The socket mark that makes the tc program send a probe to this backend."""
    if not 0 < backend_index <= consts.PROBE_INDEX_MASK:
        raise ValueError(f"backend index {backend_index}: 1..{consts.PROBE_INDEX_MASK}")
    return consts.PROBE_MARK_TAG | backend_index


@dataclass(frozen=True)
class Target:
    """One thing to probe. key is the caller's (e.g. (vip_key, backend)) and
    only needs to be hashable. initial: the state to start from ("unknown",
    or what a restarted control plane knew), reported without a transition."""

    key: Hashable
    address: str  # the VIP (tunnel probes) or the backend's address (direct)
    port: int
    kind: str = "tcp"  # "tcp": a connect; "http": GET http_path, status in http_codes
    mark: int = 0  # SO_MARK; probe_mark(index) for a tunnel probe, 0 for none
    interval: float = consts.DEFAULT_PROBE_INTERVAL_S
    timeout: float = consts.DEFAULT_PROBE_TIMEOUT_S
    rise: int = consts.DEFAULT_PROBE_RISE
    fall: int = consts.DEFAULT_PROBE_FALL
    http_path: str = "/"
    http_host: str | None = None  # Host header; None: the address
    http_codes: frozenset[int] = frozenset({200})
    initial: str = "unknown"

    def __post_init__(self):
        ip = ipaddress.ip_address(self.address)  # ValueError names the bad address
        object.__setattr__(self, "_family", socket.AF_INET6 if ip.version == 6 else socket.AF_INET)
        if self.kind not in KINDS:
            raise ValueError(f"probe kind {self.kind!r}: use one of {', '.join(KINDS)}")
        if self.initial not in STATES:
            raise ValueError(f"initial state {self.initial!r}: use one of {', '.join(STATES)}")
        if not 0 < self.port < 65536:
            raise ValueError(f"probe port {self.port}: 1..65535")
        if self.interval <= 0 or self.timeout <= 0 or self.rise < 1 or self.fall < 1:
            raise ValueError(f"probe of {self.key!r}: interval and timeout must be > 0, rise and fall >= 1")
        if not self.http_path.startswith("/") or any(c in self.http_path for c in " \r\n"):
            raise ValueError(f"http path {self.http_path!r}: an absolute path without spaces")
        object.__setattr__(self, "http_codes", frozenset(self.http_codes))

    @property
    def family(self) -> int:
        """socket.AF_INET or AF_INET6, from the address (parsed once: probes read it often)."""
        return self._family

    def request(self) -> bytes:
        host = self.http_host or (f"[{self.address}]" if ":" in self.address else self.address)
        return (f"GET {self.http_path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: l4lb-probe\r\n"
                "Connection: close\r\n\r\n").encode()


class Status(NamedTuple):
    """What results() reports for one target (a tuple: one is made per probe)."""

    state: str  # "up", "down" or "unknown"
    since: float  # time.time() of the last transition (or of the target's arrival)
    ok: bool | None = None  # the last probe's result; None before the first
    reason: str = ""  # why the last probe succeeded or failed
    latency_s: float | None = None  # the last probe's duration
    successes: int = 0  # consecutive
    failures: int = 0  # consecutive
    probes: int = 0  # probes completed since the target arrived


class ProbeFailed(Exception):
    """A probe's failure, with the reason it reports."""


@dataclass
class _Entry:
    target: Target
    status: Status
    due: float = 0.0  # loop time of the next probe
    timer: asyncio.TimerHandle | None = None
    task: "asyncio.Task | _Connect | None" = None  # the probe in flight
    gen: int = 0  # bumped when the entry's target changes: a late result of the old one is dropped


class Prober:
    """Probes its targets until stop(). on_transition(key, up, reason,
    latency_s) runs on the prober's thread; keep it short (hand work to
    another thread), since probes wait while it runs. Exceptions from it are
    logged and otherwise ignored."""

    def __init__(self, on_transition: Callable[[Hashable, bool, str, float], None]):
        self._on_transition = on_transition
        self._entries: dict[Hashable, _Entry] = {}
        self._lock = threading.Lock()  # guards the Status values results() reads
        self._stopping = False
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="l4lb-prober", daemon=True)
        self._thread.start()
        self._started.wait()

    # ---- the public side (any thread) --------------------------------------------------
    def set_targets(self, targets: Iterable[Target]) -> None:
        """Makes targets the whole set. A key that stays keeps its state and
        counters (its settings may change); a new key starts from its initial
        state; a key that is gone stops being probed."""
        new = {}
        for t in targets:
            if t.key in new:
                raise ValueError(f"target key {t.key!r} given twice")
            new[t.key] = t
        done = threading.Event()

        def apply():
            try:
                self._apply(new)
            finally:
                done.set()

        self._loop.call_soon_threadsafe(apply)
        done.wait()

    def results(self) -> dict[Hashable, Status]:
        with self._lock:
            return {k: e.status for k, e in self._entries.items()}

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._loop.call_soon_threadsafe(self._shutdown)
        self._thread.join()

    def __enter__(self) -> "Prober":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- the loop's side ---------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._started.set)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def _shutdown(self) -> None:
        self._stopping = True
        for e in self._entries.values():
            self._cancel(e)

        async def drain():
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            await asyncio.gather(*tasks, return_exceptions=True)  # sockets close in the probes' finally
            await asyncio.sleep(0)  # and aborted transports in their connection_lost, called soon
            self._loop.stop()

        self._loop.create_task(drain())

    @staticmethod
    def _cancel(e: _Entry) -> None:
        if e.timer:
            e.timer.cancel()
            e.timer = None
        if e.task:
            e.task.cancel()
            e.task = None

    def _apply(self, new: dict[Hashable, Target]) -> None:
        now = self._loop.time()
        wall = time.time()
        with self._lock:
            for key in [k for k in self._entries if k not in new]:
                self._cancel(self._entries.pop(key))
            fresh = []
            for key, t in new.items():
                e = self._entries.get(key)
                if e is None:
                    self._entries[key] = e = _Entry(t, Status(t.initial, wall))
                    fresh.append(e)
                elif e.target != t:
                    changed_probe = replace(e.target, initial=t.initial) != t
                    e.target = t
                    if changed_probe:  # another address, port, kind...: probe it anew soon
                        e.gen += 1
                        self._cancel(e)
                        fresh.append(e)
        # the new ones' first probes spread evenly over their interval
        for i, e in enumerate(fresh):
            e.due = now + e.target.interval * i / len(fresh)
            e.timer = self._loop.call_at(e.due, self._launch, e)

    def _launch(self, e: _Entry) -> None:
        e.timer = None
        if self._stopping:
            return
        if e.target.kind == "tcp":
            e.task = _Connect(self, e, self._loop)
        else:
            e.task = self._loop.create_task(self._http_probe(e, e.gen))

    def _finish(self, e: _Entry, gen: int, ok: bool, reason: str, latency: float) -> None:
        """A probe's result: counted, and the target's next probe scheduled."""
        if self._stopping or gen != e.gen or self._entries.get(e.target.key) is not e:
            return  # the target changed or left while this probe ran
        e.task = None
        self._record(e, ok, reason, latency)
        # the next probe keeps the target's place in the interval (no drift, no bunching)
        e.due = max(e.due + e.target.interval, self._loop.time())
        e.timer = self._loop.call_at(e.due, self._launch, e)

    def _record(self, e: _Entry, ok: bool, reason: str, latency: float) -> None:
        t, s = e.target, e.status
        successes = s.successes + 1 if ok else 0
        failures = 0 if ok else s.failures + 1
        state, since = s.state, s.since
        if ok and state != "up" and successes >= t.rise:
            state, since = "up", time.time()
        elif not ok and state != "down" and failures >= t.fall:
            state, since = "down", time.time()
        with self._lock:
            e.status = Status(state, since, ok, reason, latency, successes, failures, s.probes + 1)
        if state != s.state:
            try:
                self._on_transition(t.key, state == "up", reason, latency)
            except Exception:  # noqa: BLE001  a caller's bug must not stop the probes
                log.exception("on_transition for %r failed", t.key)

    async def _http_probe(self, e: _Entry, gen: int) -> None:
        t = e.target
        start = self._loop.time()
        try:
            reason = await asyncio.wait_for(self._http(t), t.timeout)
            ok = True
        except asyncio.TimeoutError:
            ok, reason = False, _timed_out(t)
        except ProbeFailed as err:
            ok, reason = False, str(err)
        except OSError as err:  # asyncio words connect errors its own way: give the system's
            ok, reason = False, os.strerror(err.errno) if err.errno else str(err)
        self._finish(e, gen, ok, reason, self._loop.time() - start)

    async def _http(self, t: Target) -> str:
        """One HTTP probe: connect, GET, read the status line. Returns why it
        succeeded; raises ProbeFailed or OSError."""
        sock = _probe_socket(t)
        try:
            await self._loop.sock_connect(sock, (t.address, t.port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=_MAX_STATUS_LINE)
            try:
                writer.write(t.request())
                line = await reader.readline()
            except ValueError as err:  # a status line longer than the limit
                raise ProbeFailed("HTTP status line too long") from err
            finally:
                writer.transport.abort()  # RST, as for TCP probes
        finally:
            sock.close()
        parts = line.split(None, 2)
        if not line or len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            raise ProbeFailed(f"no HTTP status line: {line[:60]!r}" if line else "closed without an answer")
        code = int(parts[1])
        if code not in t.http_codes:
            raise ProbeFailed(f"HTTP {code}, expected {', '.join(map(str, sorted(t.http_codes)))}")
        return f"HTTP {code}"


def _timed_out(t: Target) -> str:
    return f"no answer within {t.timeout:g} s"


def _probe_socket(t: Target) -> socket.socket:
    sock = socket.socket(t.family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        if t.mark:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, t.mark)
    except OSError:
        sock.close()
        raise
    return sock


class _Connect:
    """One TCP connect probe, driven by loop callbacks: the socket's
    writability and a timer. A task and wait_for per probe cost several times
    more CPU, and 4096 targets a second must fit in a quarter of a core."""

    __slots__ = ("prober", "loop", "entry", "gen", "sock", "fd", "timer", "start")

    def __init__(self, prober: Prober, e: _Entry, loop: asyncio.AbstractEventLoop):
        self.prober, self.loop, self.entry, self.gen = prober, loop, e, e.gen
        t = e.target
        self.start = loop.time()
        self.sock = self.fd = self.timer = None
        try:
            self.sock = _probe_socket(t)
            err = self.sock.connect_ex((t.address, t.port))
        except OSError as ex:
            loop.call_soon(self._done, False, os.strerror(ex.errno) if ex.errno else str(ex))
            return
        if err not in (errno.EINPROGRESS, 0):
            loop.call_soon(self._done, False, os.strerror(err))
            return
        self.fd = self.sock.fileno()
        loop.add_writer(self.fd, self._writable)
        self.timer = loop.call_at(self.start + t.timeout, self._expired)

    def _writable(self) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self._done(err == 0, "connected" if err == 0 else os.strerror(err))

    def _expired(self) -> None:
        self.timer = None
        self._done(False, _timed_out(self.entry.target))

    def _release(self) -> None:
        if self.timer:
            self.timer.cancel()
            self.timer = None
        if self.sock is not None:
            if self.fd is not None:
                self.loop.remove_writer(self.fd)
                self.fd = None
            self.sock.close()
            self.sock = None

    def _done(self, ok: bool, reason: str) -> None:
        self._release()
        self.prober._finish(self.entry, self.gen, ok, reason, self.loop.time() - self.start)

    def cancel(self) -> None:
        self._release()
        self.gen = -1  # a result already on its way is dropped


__all__ = ["KINDS", "STATES", "ProbeFailed", "Prober", "Status", "Target", "probe_mark"]
