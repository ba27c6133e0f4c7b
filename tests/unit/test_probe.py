"""The prober (l4lb/probe.py) against real listeners on 127.0.0.1: TCP and
HTTP results, timeouts, rise and fall counts, flapping, initial states, the
spread of probes over the interval, and changes of the target set."""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time

import pytest

from l4lb import consts
from l4lb.probe import Prober, Target, probe_mark

LOCAL = "127.0.0.1"
FAST = dict(interval=0.05, timeout=0.5)


class Server:
    """An HTTP server on 127.0.0.1 in a thread of its own. Each request takes
    the next status code of `codes` (the last one repeats); None: accept,
    read, never answer. Records each request's head and arrival time."""

    def __init__(self, codes=(200,)):
        self.codes = list(codes)
        self.requests: list[tuple[float, bytes]] = []
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait()

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)

        async def handle(reader, writer):
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append((time.monotonic(), head))
                code = self.codes.pop(0) if len(self.codes) > 1 else self.codes[0]
                if code is None:
                    await asyncio.sleep(30)
                else:
                    writer.write(f"HTTP/1.0 {code} Whatever\r\nContent-Length: 0\r\n\r\n".encode())
                    await writer.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass  # the prober gave up (timeout, stop): it resets the connection
            finally:
                writer.close()

        async def accept_only(reader, writer):
            self.requests.append((time.monotonic(), b""))
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

        async def start():
            self.http = await asyncio.start_server(handle, LOCAL, 0, backlog=1024)
            self.tcp = await asyncio.start_server(accept_only, LOCAL, 0, backlog=1024)

        self.loop.run_until_complete(start())
        self.http_port = self.http.sockets[0].getsockname()[1]
        self.tcp_port = self.tcp.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    def close(self):
        async def shut():
            for srv in (self.http, self.tcp):
                srv.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.sleep(0.01)  # the transports' connection_lost callbacks close their sockets
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(shut(), self.loop)
        self.thread.join()
        self.loop.close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


class Recorder:
    def __init__(self):
        self.events: list[tuple] = []
        self.lock = threading.Lock()

    def __call__(self, key, up, reason, latency):
        with self.lock:
            self.events.append((key, up, reason, latency))

    def of(self, key):
        with self.lock:
            return [(up, reason) for k, up, reason, _ in self.events if k == key]


@pytest.fixture
def prober():
    rec = Recorder()
    p = Prober(rec)
    p.rec = rec
    yield p
    p.stop()


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def closed_port() -> int:
    s = socket.socket()
    s.bind((LOCAL, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def probes(prober, key) -> int:
    st = prober.results().get(key)
    return st.probes if st else 0


def test_a_listening_port_turns_up_after_rise_successes(prober, server):
    prober.set_targets([Target("a", LOCAL, server.tcp_port, rise=3, **FAST)])
    wait_for(lambda: prober.rec.of("a"))
    st = prober.results()["a"]
    assert prober.rec.of("a") == [(True, "connected")]
    assert (st.state, st.ok, st.successes) == ("up", True, 3)
    assert st.probes == 3, "up on the rise-th success, not before"
    assert 0 < st.latency_s < 0.5


def test_a_closed_port_turns_down_after_fall_failures(prober):
    prober.set_targets([Target("a", LOCAL, closed_port(), fall=3, **FAST)])
    wait_for(lambda: prober.rec.of("a"))
    assert prober.rec.of("a") == [(False, "Connection refused")]
    st = prober.results()["a"]
    assert (st.state, st.ok, st.failures, st.probes) == ("down", False, 3, 3)


@pytest.mark.parametrize("codes,expected,up,reason", [
    ((200,), {200}, True, "HTTP 200"),
    ((503,), {200}, False, "HTTP 503, expected 200"),
    ((503,), {200, 503}, True, "HTTP 503"),
    ((204,), {200, 204}, True, "HTTP 204"),
])
def test_http_probes_judge_the_status_code(prober, codes, expected, up, reason):
    s = Server(codes)
    try:
        prober.set_targets([Target("h", LOCAL, s.http_port, kind="http", http_codes=expected, rise=1, fall=1,
                                   **FAST)])
        wait_for(lambda: prober.rec.of("h"))
        assert prober.rec.of("h")[0] == (up, reason)
    finally:
        s.close()


def test_http_probes_send_the_path_and_host(prober, server):
    prober.set_targets([Target("h", LOCAL, server.http_port, kind="http", http_path="/healthz?full=1",
                               http_host="svc.example", rise=1, **FAST)])
    wait_for(lambda: prober.rec.of("h"))
    head = server.requests[0][1].decode()
    assert head.startswith("GET /healthz?full=1 HTTP/1.0\r\n")
    assert "\r\nHost: svc.example\r\n" in head


def test_an_http_server_that_never_answers_times_out(prober):
    s = Server([None])
    try:
        prober.set_targets([Target("h", LOCAL, s.http_port, kind="http", interval=0.05, timeout=0.2,
                                   fall=2)])
        wait_for(lambda: prober.rec.of("h"))
        assert prober.rec.of("h") == [(False, "no answer within 0.2 s")]
        assert 0.2 <= prober.results()["h"].latency_s < 0.4
    finally:
        s.close()


def test_a_connect_that_gets_no_answer_times_out(prober):
    """A listener whose accept queue is full drops SYNs: the connect hangs."""
    lsock = socket.socket()
    lsock.bind((LOCAL, 0))
    lsock.listen(0)
    fillers = []
    try:
        for _ in range(2):  # backlog 0 still queues one: fill it
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(lsock.getsockname())
            fillers.append(c)
        time.sleep(0.1)
        prober.set_targets([Target("t", LOCAL, lsock.getsockname()[1], interval=0.05, timeout=0.2, fall=1)])
        wait_for(lambda: prober.rec.of("t"))
        assert prober.rec.of("t") == [(False, "no answer within 0.2 s")]
    finally:
        for c in fillers:
            c.close()
        lsock.close()


def test_flapping_never_transitions_more_often_than_the_counts_allow(prober):
    """Results alternating good/bad never make rise=2 or fall=2 in a row; a
    pattern of 2 good, 2 bad flips at most once per 2 probes."""
    alternating = Server([200, 500] * 20)
    pairs = Server([200, 200, 500, 500] * 10)
    pairs3 = Server([200, 200, 500, 500] * 10)
    try:
        prober.set_targets([
            Target("alt", LOCAL, alternating.http_port, kind="http", rise=2, fall=2, initial="up", **FAST),
            Target("pairs", LOCAL, pairs.http_port, kind="http", rise=2, fall=2, **FAST),
            Target("pairs3", LOCAL, pairs3.http_port, kind="http", rise=3, fall=3, initial="down", **FAST),
        ])
        wait_for(lambda: probes(prober, "alt") >= 20 and probes(prober, "pairs") >= 16)
        assert prober.rec.of("alt") == [], "never two failures in a row"
        assert prober.rec.of("pairs3") == [], "never three results alike in a row"
        flips = prober.rec.of("pairs")
        assert flips, "two in a row do flip it"
        assert len(flips) <= probes(prober, "pairs") // 2
        assert all(a[0] != b[0] for a, b in zip(flips, flips[1:])), "transitions alternate"
    finally:
        for s in (alternating, pairs, pairs3):
            s.close()


def test_initial_states_are_honoured_without_a_transition(prober, server):
    dead = closed_port()
    prober.set_targets([
        Target("up-healthy", LOCAL, server.tcp_port, initial="up", **FAST),
        Target("down-dead", LOCAL, dead, initial="down", **FAST),
        Target("up-dead", LOCAL, dead, initial="up", fall=4, **FAST),
        Target("down-healthy", LOCAL, server.tcp_port, initial="down", rise=2, **FAST),
    ])
    assert {k: s.state for k, s in prober.results().items()} == {
        "up-healthy": "up", "down-dead": "down", "up-dead": "up", "down-healthy": "down"}
    wait_for(lambda: prober.rec.of("up-dead") and prober.rec.of("down-healthy"))
    wait_for(lambda: probes(prober, "up-healthy") >= 5 and probes(prober, "down-dead") >= 5)
    assert prober.rec.of("up-healthy") == [] and prober.rec.of("down-dead") == []
    assert prober.rec.of("down-healthy") == [(True, "connected")]
    assert prober.rec.of("up-dead") == [(False, "Connection refused")]


def test_probes_spread_over_the_interval(prober, server):
    n, interval = 40, 1.0
    prober.set_targets([Target(i, LOCAL, server.tcp_port, interval=interval) for i in range(n)])
    wait_for(lambda: len(server.requests) >= n, timeout=3)
    times = sorted(t for t, _ in server.requests[:n])
    span = times[-1] - times[0]
    assert 0.8 * interval < span < 1.2 * interval, "the first round takes the whole interval"
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) < 5 * interval / n, "no hole in the spread"
    per_tenth = [sum(1 for t in times if times[0] + k / 10 <= t < times[0] + (k + 1) / 10) for k in range(10)]
    assert max(per_tenth) <= 2 * n / 10, f"no burst: {per_tenth}"


def test_set_targets_keeps_the_state_of_keys_that_stay(prober, server):
    prober.set_targets([Target("keep", LOCAL, server.tcp_port, rise=1, **FAST),
                        Target("gone", LOCAL, server.tcp_port, **FAST)])
    wait_for(lambda: prober.rec.of("keep"))
    before = prober.results()["keep"]
    prober.set_targets([Target("keep", LOCAL, server.tcp_port, rise=1, **FAST),
                        Target("new", LOCAL, server.tcp_port, initial="down", **FAST)])
    res = prober.results()
    assert set(res) == {"keep", "new"}
    assert res["keep"].state == "up" and res["keep"].since == before.since
    assert res["new"].state == "down"
    time.sleep(0.2)
    assert prober.rec.of("keep") == [(True, "connected")], "no second transition"


def test_targets_are_checked_when_made():
    with pytest.raises(ValueError, match="probe kind"):
        Target("x", LOCAL, 80, kind="udp")
    with pytest.raises(ValueError, match="initial state"):
        Target("x", LOCAL, 80, initial="maybe")
    with pytest.raises(ValueError):
        Target("x", "not-an-address", 80)
    with pytest.raises(ValueError, match="http path"):
        Target("x", LOCAL, 80, kind="http", http_path="/a b")
    assert Target("x", "fd00:198:18:10::10", 80).family == socket.AF_INET6
    assert Target("x", "fd00:198:18:10::10", 80, kind="http").request().split(b"\r\n")[1] == \
        b"Host: [fd00:198:18:10::10]"


def test_duplicate_keys_are_refused(prober, server):
    with pytest.raises(ValueError, match="twice"):
        prober.set_targets([Target("a", LOCAL, server.tcp_port), Target("a", LOCAL, server.tcp_port)])


def test_probe_marks_carry_the_tag_and_the_index():
    assert probe_mark(7) == consts.PROBE_MARK_TAG | 7
    assert probe_mark(7) & consts.PROBE_MARK_MASK == consts.PROBE_MARK_TAG
    for bad in (0, consts.PROBE_INDEX_MASK + 1):
        with pytest.raises(ValueError):
            probe_mark(bad)


def test_a_gue_probe_mark_sets_a_bit_outside_the_index_and_the_tag():
    gue = probe_mark(7, gue=True)
    assert gue == consts.PROBE_MARK_TAG | consts.PROBE_MARK_GUE | 7
    assert gue & consts.PROBE_MARK_MASK == consts.PROBE_MARK_TAG  # still a probe
    assert gue & consts.PROBE_INDEX_MASK == 7  # still backend 7
    assert consts.PROBE_MARK_GUE & (consts.PROBE_MARK_MASK | consts.PROBE_INDEX_MASK) == 0
    assert probe_mark(consts.PROBE_INDEX_MASK, gue=True) & consts.PROBE_INDEX_MASK == consts.PROBE_INDEX_MASK


@pytest.mark.skipif(os.geteuid() != 0, reason="SO_MARK needs CAP_NET_ADMIN")
def test_a_marked_probe_connects(prober, server):
    prober.set_targets([Target("m", LOCAL, server.tcp_port, mark=probe_mark(3), rise=1, **FAST)])
    wait_for(lambda: prober.rec.of("m"))
    assert prober.rec.of("m") == [(True, "connected")]


def test_stop_ends_the_thread_with_probes_in_flight(server):
    s = Server([None])
    try:
        p = Prober(lambda *a: None)
        p.set_targets([Target(i, LOCAL, s.http_port, kind="http", timeout=5) for i in range(20)])
        time.sleep(0.3)
        t0 = time.monotonic()
        p.stop()
        assert time.monotonic() - t0 < 1.0
        assert not any(t.name == "l4lb-prober" and t.is_alive() for t in threading.enumerate())
    finally:
        s.close()


def test_cpu_times_count_the_probers_thread_only(prober, server):
    """The prober's own CPU: it grows while probes run, and work on another
    thread of the process does not move it."""
    total0, user0, system0 = prober.cpu_times()
    busy_until = time.thread_time() + 0.3
    while time.thread_time() < busy_until:  # 0.3 s of CPU on this thread
        pass
    total1, _, _ = prober.cpu_times()
    assert total1 - total0 < 0.1
    prober.set_targets([Target(i, LOCAL, server.tcp_port, interval=0.01, rise=1) for i in range(50)])
    time.sleep(0.5)
    total2, user2, system2 = prober.cpu_times()
    assert total2 > total1
    assert user2 + system2 >= user0 + system0


class Answerer:
    """A listener on 127.0.0.1 that answers every connection with the given
    pieces (a pause between them), then closes, whatever was asked."""

    def __init__(self, pieces):
        self.sock = socket.socket()
        self.sock.bind((LOCAL, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.pieces = pieces
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with contextlib.suppress(OSError), conn:
                conn.recv(4096)
                for piece in self.pieces:
                    conn.sendall(piece)
                    time.sleep(0.02)

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("pieces,up,reason", [
    ([], False, "closed without an answer"),
    ([b"garbage\r\n"], False, "no HTTP status line: b'garbage\\r\\n'"),
    ([b"X" * 3000], False, "HTTP status line too long"),
    ([b"HTTP/1.1 2", b"00 OK\r\n"], True, "HTTP 200"),
    ([b"HTTP/1.0 204 No Content"], True, "HTTP 204"),  # no line end before the close
], ids=["closed", "garbage", "too-long", "in-pieces", "no-newline"])
def test_http_answers_are_judged_as_they_arrive(prober, pieces, up, reason):
    a = Answerer(pieces)
    try:
        prober.set_targets([Target("a", LOCAL, a.port, kind="http", http_codes=frozenset({200, 204}),
                                   rise=1, fall=1, **FAST)])
        wait_for(lambda: prober.rec.of("a"))
        assert prober.rec.of("a")[0] == (up, reason)
    finally:
        a.close()
