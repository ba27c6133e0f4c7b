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
import heapq
import ipaddress
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from . import consts

log = logging.getLogger("l4lb.probe")

KINDS = ("tcp", "http")
STATES = ("up", "down", "unknown")
_LINGER_RST = struct.pack("ii", 1, 0)  # close with a RST: no TIME_WAIT per probe on the prober's side
_MAX_STATUS_LINE = 1024


def probe_mark(backend_index: int, gue: bool = False) -> int:
    """The socket mark that makes the tc program send a probe to this backend,
    in GUE (as a VIP with encap: gue sends its packets) or in IP-in-IP."""
    if not 0 < backend_index <= consts.PROBE_INDEX_MASK:
        raise ValueError(f"backend index {backend_index}: 1..{consts.PROBE_INDEX_MASK}")
    return consts.PROBE_MARK_TAG | (consts.PROBE_MARK_GUE if gue else 0) | backend_index


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
        object.__setattr__(self, "_sockaddr", (self.address, self.port))
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

    @property
    def sockaddr(self) -> tuple[str, int]:
        return self._sockaddr

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


class _Entry:
    """A target and its probing: where it stands in the wheel and its probe
    in flight (socket, fd, start; for HTTP, the answer read so far)."""

    __slots__ = ("target", "status", "due", "slot", "deadline", "sock", "fd", "start", "answer", "gen")

    def __init__(self, target: Target, status: Status):
        self.target, self.status = target, status
        self.due = 0.0  # loop time of the next probe
        self.slot = -1  # the wheel slot of the next probe; -1: none scheduled
        self.deadline = -1  # the wheel slot where the TCP probe in flight times out
        self.sock: socket.socket | None = None  # the probe in flight
        self.fd = -1
        self.start = 0.0
        self.answer: bytes | None = None  # HTTP: None while connecting, then what came back so far
        self.gen = 0  # bumped when the target changes: a late result of the old one is dropped


TICK = 0.005  # seconds: the wheel's slot; probes start and time out on these boundaries (never early)
_FAILED = select.EPOLLERR | select.EPOLLHUP
_SOCK_TYPE = socket.SOCK_STREAM | socket.SOCK_NONBLOCK  # no extra system call to make it non-blocking


class Prober:
    """Probes its targets until stop(). on_transition(key, up, reason,
    latency_s) runs on the prober's thread; keep it short (hand work to
    another thread), since probes wait while it runs. Exceptions from it are
    logged and otherwise ignored.

    One timer wheel drives every target: slot n (TICK seconds each) lists the
    targets whose next probe starts then and the TCP probes that time out
    then, and the loop has one timer, for the earliest slot. Every probe is a
    plain non-blocking socket in an epoll set of the prober's own, whose fd
    the loop watches: no task, future, transport or timer handle per probe,
    and no system call a probe does not need (the socket is made
    non-blocking when created; closing it leaves the epoll set; SO_ERROR is
    read only when the connect failed). An HTTP probe, once connected, sends
    its request and waits in the same set for the status line."""

    def __init__(self, on_transition: Callable[[Hashable, bool, str, float], None]):
        self._on_transition = on_transition
        self._entries: dict[Hashable, _Entry] = {}
        self._lock = threading.Lock()  # guards the Status values results() reads
        self._stopping = False
        self._starts: dict[int, list[_Entry]] = {}  # slot -> targets whose probe starts then
        self._expiries: dict[int, list[_Entry]] = {}  # slot -> TCP probes that time out then
        self._slots: list[int] = []  # heap of the slots above (a slot may appear twice)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_slot = -1
        self._ticking = False
        self._inflight: dict[int, _Entry] = {}  # fd -> target, TCP probes waiting in the epoll set
        self._epoll = select.epoll()
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

    def cpu_times(self) -> tuple[float, float, float]:
        """(total, user, system) CPU seconds of the prober's thread so far:
        every probe, the loop and on_transition run there. The total is the
        thread's CPU clock (ns resolution), the split the kernel's tick counts."""
        total = time.clock_gettime(time.pthread_getcpuclockid(self._thread.ident))
        fields = Path(f"/proc/self/task/{self._thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return total, int(fields[11]) / tick, int(fields[12]) / tick

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
        self._loop.add_reader(self._epoll.fileno(), self._connected)
        self._loop.call_soon(self._started.set)
        try:
            self._loop.run_forever()
        finally:
            self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._loop.close()

    def _shutdown(self) -> None:
        self._stopping = True
        if self._timer:
            self._timer.cancel()
        for e in self._entries.values():
            self._cancel(e)
        self._loop.stop()

    def _cancel(self, e: _Entry) -> None:
        e.slot = -1  # a start still listed in the wheel is skipped
        if e.sock is not None:
            del self._inflight[e.fd]
            e.sock.close()
            e.sock, e.fd, e.deadline, e.answer = None, -1, -1, None

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
            self._schedule(e, now + e.target.interval * i / len(fresh))

    # -- the wheel
    def _schedule(self, e: _Entry, due: float) -> None:
        e.due = due
        e.slot = slot = int(due / TICK) + 1
        starts = self._starts.get(slot)
        if starts is None:
            self._starts[slot] = [e]
            self._wake_at(slot)
        else:
            starts.append(e)

    def _wake_at(self, slot: int) -> None:
        heapq.heappush(self._slots, slot)
        if self._ticking:
            return  # _tick sets the timer when it is done
        if self._timer is None or slot < self._timer_slot:
            if self._timer:
                self._timer.cancel()
            self._timer_slot = slot
            self._timer = self._loop.call_at(slot * TICK, self._tick)

    def _tick(self) -> None:
        """Runs the slots that are due: expiries first, then starts."""
        self._timer = None
        if self._stopping:
            return
        slots, starts, expiries = self._slots, self._starts, self._expiries
        now_slot = int(self._loop.time() / TICK + 1e-3)  # the loop may call a little early
        self._ticking = True
        try:
            while slots and slots[0] <= now_slot:
                n = heapq.heappop(slots)
                for e in expiries.pop(n, ()):
                    if e.deadline == n and e.sock is not None:
                        self._expire(e)
                for e in starts.pop(n, ()):
                    if e.slot == n:
                        self._launch(e)
        finally:
            self._ticking = False
        if slots:
            self._timer_slot = slots[0]
            self._timer = self._loop.call_at(slots[0] * TICK, self._tick)

    def _launch(self, e: _Entry) -> None:
        e.slot = -1
        t = e.target
        start = self._loop.time()
        try:
            sock = socket.socket(t.family, _SOCK_TYPE)
        except OSError as ex:
            self._finish(e, e.gen, False, _why(ex), 0.0)
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            if t.mark:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, t.mark)
            err = sock.connect_ex(t.sockaddr)
            if err == errno.EINPROGRESS:
                fd = sock.fileno()
                self._epoll.register(fd, select.EPOLLOUT)
        except OSError as ex:
            sock.close()
            self._finish(e, e.gen, False, _why(ex), self._loop.time() - start)
            return
        if err != errno.EINPROGRESS:
            sock.close()
            self._finish(e, e.gen, not err, os.strerror(err) if err else "connected", self._loop.time() - start)
            return
        e.sock, e.fd, e.start = sock, fd, start
        self._inflight[fd] = e
        e.deadline = slot = int((start + t.timeout) / TICK) + 1
        expiries = self._expiries.get(slot)
        if expiries is None:
            self._expiries[slot] = [e]
            self._wake_at(slot)
        else:
            expiries.append(e)

    def _connected(self) -> None:
        """The epoll set says some probes moved: a connect finished (or
        failed), or an HTTP answer arrived."""
        now = self._loop.time()
        inflight = self._inflight
        for fd, events in self._epoll.poll(0):
            e = inflight.get(fd)
            if e is None:
                continue
            sock = e.sock
            if e.answer is not None:
                verdict = self._http_read(e)
                if verdict is None:
                    continue  # more to come
                ok, reason = verdict
            elif events & _FAILED:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                ok, reason = False, os.strerror(err) if err else "connection failed"
            elif e.target.kind != "tcp":
                verdict = self._http_send(e)
                if verdict is None:
                    continue  # the request is out: the answer comes through the same set
                ok, reason = verdict
            else:
                ok, reason = True, "connected"
            del inflight[fd]
            sock.close()  # a RST (SO_LINGER 0); the fd leaves the epoll set with it
            e.sock, e.fd, e.deadline, e.answer = None, -1, -1, None
            self._finish(e, e.gen, ok, reason, now - e.start)

    def _http_send(self, e: _Entry) -> tuple[bool, str] | None:
        """Connected: the request goes out whole (a few hundred bytes into an
        empty send buffer), then the socket waits for the answer. None, or
        the probe's verdict when sending failed."""
        request = e.target.request()
        try:
            sent = e.sock.send(request)
        except OSError as err:
            return False, _why(err)
        if sent != len(request):
            return False, "the request did not fit the send buffer"
        e.answer = b""
        self._epoll.modify(e.fd, select.EPOLLIN)
        return None

    def _http_read(self, e: _Entry) -> tuple[bool, str] | None:
        """What arrived of the answer; the verdict once the status line is
        whole (or the server closed, or sent too much without one), else None."""
        try:
            data = e.sock.recv(_MAX_STATUS_LINE)
        except BlockingIOError:
            return None
        except OSError as err:
            return False, _why(err)
        e.answer += data
        line, newline, _ = e.answer.partition(b"\n")
        if not newline:
            if len(e.answer) >= _MAX_STATUS_LINE:
                return False, "HTTP status line too long"
            if data:
                return None
        return _http_verdict(e.target, line + newline)

    def _expire(self, e: _Entry) -> None:
        del self._inflight[e.fd]
        e.sock.close()
        e.sock, e.fd, e.deadline, e.answer = None, -1, -1, None
        self._finish(e, e.gen, False, _timed_out(e.target), self._loop.time() - e.start)

    def _finish(self, e: _Entry, gen: int, ok: bool, reason: str, latency: float) -> None:
        """A probe's result: counted, and the target's next probe scheduled."""
        if self._stopping or gen != e.gen or self._entries.get(e.target.key) is not e:
            return  # the target changed or left while this probe ran
        self._record(e, ok, reason, latency)
        # the next probe keeps the target's place in the interval (no drift, no bunching)
        due = e.due + e.target.interval
        self._schedule(e, due if due > (now := self._loop.time()) else now)

    def _record(self, e: _Entry, ok: bool, reason: str, latency: float) -> None:
        t, s = e.target, e.status
        if ok:
            successes, failures = s.successes + 1, 0
            flip = s.state != "up" and successes >= t.rise
        else:
            successes, failures = 0, s.failures + 1
            flip = s.state != "down" and failures >= t.fall
        if flip:
            state, since = ("up" if ok else "down"), time.time()
        else:
            state, since = s.state, s.since
        status = Status(state, since, ok, reason, latency, successes, failures, s.probes + 1)
        with self._lock:
            e.status = status
        if flip:
            try:
                self._on_transition(t.key, ok, reason, latency)
            except Exception:  # noqa: BLE001  a caller's bug must not stop the probes
                log.exception("on_transition for %r failed", t.key)


def _http_verdict(t: Target, line: bytes) -> tuple[bool, str]:
    """The probe's verdict on the answer's status line (b"" if none came)."""
    parts = line.split(None, 2)
    if not line or len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return False, f"no HTTP status line: {line[:60]!r}" if line else "closed without an answer"
    code = int(parts[1])
    if code not in t.http_codes:
        return False, f"HTTP {code}, expected {', '.join(map(str, sorted(t.http_codes)))}"
    return True, f"HTTP {code}"


def _why(err: OSError) -> str:
    return os.strerror(err.errno) if err.errno else str(err)


def _timed_out(t: Target) -> str:
    return f"no answer within {t.timeout:g} s"


__all__ = ["KINDS", "STATES", "Prober", "Status", "Target", "probe_mark"]
