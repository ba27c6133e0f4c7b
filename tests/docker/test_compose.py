"""The end-to-end checks with containers: docker/compose.yaml's LB, backends,
router and client on a Docker engine (one is started, and Debian's docker.io
installed, when none answers), driven through the LB's published gRPC port
with mutual TLS and real TCP connections from the client container.

Skipped, with the reason, only when no engine can be had (or L4LB_DOCKER=0).
Everything built or started for the run is removed at the end, failures
included; the base image l4lb/bookworm-base stays as a cache."""
from __future__ import annotations

import collections
import json
import logging
import os
import queue
import re
import threading
import time

import grpc
import pytest

import dockerenv
from control.client import Client
from control.l4lb.v1 import l4lb_pb2 as pb
from dockerstack import BACKENDS, Stack
from l4lb.flowhash import flow_hash, ring_slot
from l4lb.maglev import maglev_table

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]
RING = 65537


@pytest.fixture(scope="module")
def stack(pytestconfig, tmp_path_factory):
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")

    def say(msg):  # progress on the terminal as it happens, past pytest's capture
        if reporter and capture:
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"docker: {msg}")

    class Relay(logging.Handler):  # what dockerenv does (installs, starts, builds), as it happens
        def emit(self, record):
            say(record.getMessage())

    if os.environ.get("L4LB_DOCKER", "").strip() == "0":
        pytest.skip("L4LB_DOCKER=0: the Docker tests are turned off")
    relay = Relay()
    dockerenv.log.addHandler(relay)
    dockerenv.log.setLevel(logging.INFO)
    t0 = time.monotonic()
    try:
        engine = dockerenv.ensure_engine()
    except dockerenv.DockerEnvError as e:
        dockerenv.log.removeHandler(relay)
        pytest.skip(f"no Docker engine can be had: {e}")
    say(f"engine {engine.version} " + (f"started for this run (pid {engine.started_pid})" if engine.started_pid
                                       else "already running") + f", compose: {' '.join(engine.compose)}, "
        f"{time.monotonic() - t0:.1f} s")
    s = Stack(engine, tmp_path_factory.mktemp("docker"), say=say)
    try:
        try:
            s.base_image()
        except dockerenv.DockerEnvError as e:
            if os.geteuid() == 0:
                raise
            pytest.skip(f"no base image {dockerenv.BASE_IMAGE} and no way to make one: {e}")
        s.up()
        yield s
    finally:
        try:
            s.down()
        finally:
            engine.stop()
            say(f"total {time.monotonic() - t0:.1f} s")
            dockerenv.log.removeHandler(relay)


# The client's fixed source ports: above the kernel's ephemeral range (32768-60999), so
# that no other socket in the client's namespace can hold one of them.
SPORTS = 61000


def predicted(stack: Stack, vip: str, backends: dict[str, int], sport: int) -> str:
    """The backend name Maglev gives a new flow from the client (what the program must do)."""
    table = maglev_table(backends, RING)
    return stack.backend_name(table[ring_slot(flow_hash(stack.client_addr, vip, sport, 80, 6), RING)])


def add_vip(stack: Stack, vip: str, names=tuple(BACKENDS)) -> dict[str, int]:
    backends = {stack.backend_addr(n): 1 for n in names}
    with stack.client() as c:
        c.call("AddVip", pb.AddVipRequest(id=pb.VipId(address=vip, port=80, protocol="tcp"),
                                          backends=[pb.Backend(address=a, weight=w) for a, w in backends.items()]))
    return backends


def spread(stack: Stack, vip: str, count: int, first_sport: int) -> list[dict]:
    r = stack.exec("client", "l4lb-client", "spread", f"{vip}:80", "--count", str(count),
                   "--sport", str(first_sport), "--json", check=False)
    out = json.loads(r.stdout)
    assert out["errors"] == 0, f"failed connections: {[x for x in out['results'] if 'error' in x][:5]}\n" \
                               f"{stack.logs('lb')}"
    return out["results"]


class Session:
    """One TCP connection from the client container to a VIP; ask() sends one
    request on it and returns the backend's name."""

    def __init__(self, stack: Stack, vip: str, sport: int):
        self.proc = stack.popen("client", "l4lb-client", "session", f"{vip}:80", "--sport", str(sport))
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        first = self.lines.get(timeout=30)
        assert first == f"connected {sport}", first

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("error: the session ended")

    def ask(self, timeout: float = 10) -> str:
        self.proc.stdin.write("get\n")
        self.proc.stdin.flush()
        line = self.lines.get(timeout=timeout)
        assert not line.startswith("error"), line
        return line.split()[0]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=15)
            except Exception:  # noqa: BLE001
                self.proc.kill()


def test_lb_runs_generic_xdp_and_serves_grpc_with_mutual_tls_on_loopback(stack):
    with stack.client() as c:
        st = c.call("GetStatus", pb.GetStatusRequest())
    assert st.attach_mode == "generic" and st.program_id > 0
    link = stack.exec("lb", "ip", "-d", "link", "show", st.interface).stdout
    assert f"prog/xdp id {st.program_id} " in link and "xdpgeneric" in link
    port = stack.engine.run("port", stack.containers["lb"], "50051/tcp").stdout.split()
    assert port == [f"127.0.0.1:{stack.port}"]  # published on the host's loopback only
    # without a client certificate the server refuses the call
    with Client(f"127.0.0.1:{stack.port}", timeout=5, tls_ca=stack.tls["tls_ca"]) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.call("GetStatus", pb.GetStatusRequest())
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_connections_spread_over_the_backends_as_maglev_predicts(stack):
    vip = stack.addr(100)
    backends = add_vip(stack, vip)
    results = spread(stack, vip, 90, SPORTS)
    counts = collections.Counter(r["backend"] for r in results)
    assert set(counts) == set(BACKENDS), counts
    assert min(counts.values()) >= 10, counts  # 30 each expected
    wrong = [(r["sport"], r["backend"], predicted(stack, vip, backends, r["sport"])) for r in results
             if r["backend"] != predicted(stack, vip, backends, r["sport"])]
    assert not wrong, f"connections that reached another backend than Maglev's: {wrong[:10]}"
    with stack.client() as c:
        v = c.call("GetVip", pb.GetVipRequest(id=pb.VipId(address=vip, port=80, protocol="tcp")))
    assert v.packets >= 90 * 4  # SYN, ACK, request, FIN at least; the answers bypass the LB


def test_a_bulk_upload_through_the_lb_arrives_whole(stack):
    """Full-size segments: the router segments what it forwards, and the LB
    answers the first 1500-byte packet with "fragmentation needed" (the
    encapsulation takes 20 bytes), after which the client sends smaller ones."""
    vip = stack.addr(103)
    add_vip(stack, vip)
    size = 3_000_000
    for _ in range(2):
        r = stack.exec("client", "sh", "-c", f"head -c {size} /dev/zero | curl -sS -m 60 --data-binary @- "
                                             f"http://{vip}/", timeout=90)
        name, got = r.stdout.split()
        assert name in BACKENDS and int(got) == size, r.stdout


def test_a_drained_backend_gets_no_new_connections_and_keeps_its_established_one(stack):
    vip = stack.addr(101)
    backends = add_vip(stack, vip)
    drained = "backend-1"
    sport = next(p for p in range(SPORTS + 1000, SPORTS + 2000) if predicted(stack, vip, backends, p) == drained)
    session = Session(stack, vip, sport)
    try:
        assert session.ask() == drained
        with stack.client() as c:
            c.call("SetBackendWeights", pb.SetBackendWeightsRequest(
                id=pb.VipId(address=vip, port=80, protocol="tcp"),
                backends=[pb.Backend(address=stack.backend_addr(drained), weight=0)]))
        results = spread(stack, vip, 60, SPORTS + 2000)
        counts = collections.Counter(r["backend"] for r in results)
        assert drained not in counts and set(counts) == set(BACKENDS) - {drained}, counts
        after = dict(backends, **{stack.backend_addr(drained): 0})
        assert all(r["backend"] == predicted(stack, vip, after, r["sport"]) for r in results)
        # the established connection stays with its backend through the connection table
        assert [session.ask() for _ in range(5)] == [drained] * 5
    finally:
        session.close()


def test_an_established_connection_survives_a_restart_of_the_control_plane(stack):
    vip = stack.addr(102)
    add_vip(stack, vip)
    with stack.client() as c:
        before = c.call("GetStatus", pb.GetStatusRequest())
    session = Session(stack, vip, SPORTS + 2100)
    answers, failures, stop = [], [], threading.Event()
    try:
        first = session.ask()

        def pump():  # one request every 100 ms on the same connection, all through the restart
            try:
                while not stop.is_set():
                    answers.append((time.monotonic(), session.ask()))
                    time.sleep(0.1)
            except Exception as e:  # noqa: BLE001 (reported by the test below)
                failures.append(f"{type(e).__name__}: {e}")

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        time.sleep(1)
        t_restart = time.monotonic()
        r = stack.exec("lb", "l4lb-restart", timeout=180)
        t_back = time.monotonic()
        m = re.search(r"pid (\d+) -> (\d+)", r.stdout)
        assert m and m.group(1) != m.group(2), r.stdout
        time.sleep(1)
        stop.set()
        t.join(timeout=30)
        assert not t.is_alive()
        assert not failures, f"the connection failed after {len(answers)} answers: {failures[0]}"
        during = [a for ts, a in answers if t_restart <= ts <= t_back]
        assert during, "no request was made while the control plane restarted"
        assert {a for _, a in answers} == {first}, collections.Counter(a for _, a in answers)
        assert session.ask() == first
    finally:
        stop.set()
        session.close()
    with stack.client() as c:
        after = c.call("GetStatus", pb.GetStatusRequest())
        vips = {(v.id.address, v.id.port) for v in c.call("ListVips", pb.ListVipsRequest()).vips}
    assert after.program_id == before.program_id  # the same program kept forwarding
    assert (vip, 80) in vips and (stack.addr(100), 80) in vips  # the new process adopted the state
    # and new connections are balanced as before
    assert {r["backend"] for r in spread(stack, vip, 30, SPORTS + 2200)} == set(BACKENDS)
