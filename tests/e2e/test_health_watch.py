"""WatchHealth against `l4lb run` in the testbed, with the backends' real
servers: stopping one's server streams up -> down with the probe's reason
(by then the table is without it and real connections avoid it), starting it
again streams down -> up; a snapshot opens the stream; a watch hears its VIP
only; `l4lb health --watch` as a subprocess prints the same and follows the
server across a restart of `l4lb run`; a flapping server changes the table
no more often than rise and fall allow; a backend that stops decapsulating is
down through the tunnel and up through the direct route."""
from __future__ import annotations

import contextlib
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from control.client import Client
from control.l4lb.v1 import l4lb_pb2 as pb
from e2e_util import close_all, open_many, vip_id

L4LB = str(Path(sys.executable).with_name("l4lb"))
CHECK = pb.HealthCheck(kind="tcp", interval=0.3, timeout=0.2, rise=2, fall=2)  # the VIP's port: the real server's
WAIT = 15.0  # seconds for anything to show: a probe round, the commit, a loaded machine


class Watch:
    """A WatchHealth stream read by a thread of its own into a queue."""

    def __init__(self, address: str, request: pb.WatchHealthRequest):
        self.client = Client(address)
        self.call = self.client.stub.WatchHealth(request)
        self.events: queue.Queue = queue.Queue()
        self.error: grpc.RpcError | None = None
        self.call.initial_metadata()  # the server registered the watch
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for e in self.call:
                self.events.put(e)
        except grpc.RpcError as e:
            self.error = e
        self.events.put(None)

    def next(self, timeout: float = WAIT) -> pb.HealthEvent:
        e = self.events.get(timeout=timeout)
        assert e is not None, f"the stream ended: {self.error}"
        return e

    def close(self):
        self.call.cancel()
        self.client.close()


@contextlib.contextmanager
def checked(lb, vid, addrs):
    with lb.vip(vid.address, {a: 1 for a in addrs}):
        lb.call("SetHealthCheck", pb.SetHealthCheckRequest(id=vid, health=CHECK))
        deadline = time.monotonic() + WAIT
        # up, and probed (the first tunnel check loads the tc program first)
        while {(b.health, b.last_result) for b in lb.call("GetVip", pb.GetVipRequest(id=vid)).backends} != \
                {("up", "connected")}:
            assert time.monotonic() < deadline, "the backends did not come up"
            time.sleep(0.05)
        yield


@contextlib.contextmanager
def server_stopped(bed, backend):
    bed.stop_server(backend)
    try:
        yield
    finally:
        if backend.server is None:
            bed.start_server(backend)


def picks(lb, bed, vid, n: int = 150) -> set[str]:
    return {lb.lookup(bed.clients[0].addr4, vid.address, 20000 + i, 80) for i in range(n)}


def test_a_stopped_server_streams_up_to_down_with_its_reason_and_back(bed, lb):
    vid = vip_id(bed.vip4(12))
    b1 = bed.backends[0]
    addrs = [b.addr4 for b in bed.backends]
    with checked(lb, vid, addrs):
        w = Watch(bed.lb.grpc_address, pb.WatchHealthRequest(id=vid, snapshot=True))
        try:
            first = [w.next() for _ in addrs]
            assert {(e.backend, e.old_state, e.new_state, e.snapshot) for e in first} == \
                {(a, "", "up", True) for a in addrs}
            assert all(e.id == vid and not e.panic for e in first)
            t0 = time.time()
            with server_stopped(bed, b1):
                e = w.next()
                assert (e.backend, e.old_state, e.new_state, e.snapshot) == (b1.addr4, "up", "down", False)
                assert "refused" in e.reason.lower(), e.reason
                assert t0 <= e.time <= time.time() and e.id == vid and not e.panic
                assert picks(lb, bed, vid) == set(addrs[1:]), "the event came before the table changed"
                conns = open_many(bed, vid.address, 24)  # real connections: none meets the stopped server
                try:
                    assert {c.backend for c in conns} == {b.role for b in bed.backends[1:]}
                finally:
                    close_all(conns)
                t1 = time.time()
            e = w.next()
            assert (e.backend, e.old_state, e.new_state, e.reason) == (b1.addr4, "down", "up", "connected")
            assert t1 <= e.time <= time.time()
            assert picks(lb, bed, vid) == set(addrs)
            with pytest.raises(queue.Empty):
                w.events.get(timeout=4 * CHECK.interval)  # one event per transition, nothing else
        finally:
            w.close()


def test_a_watch_hears_only_its_vip_and_every_vip_without_one(bed, lb):
    v1, v2 = vip_id(bed.vip4(13)), vip_id(bed.vip4(14))
    b2 = bed.backends[1]
    with checked(lb, v1, [b2.addr4]), checked(lb, v2, [b.addr4 for b in bed.backends]):
        only = Watch(bed.lb.grpc_address, pb.WatchHealthRequest(id=v1))
        every = Watch(bed.lb.grpc_address, pb.WatchHealthRequest())
        try:
            with server_stopped(bed, b2):
                got = {(every.next().id.address, "down") for _ in range(2)}
                assert got == {(v1.address, "down"), (v2.address, "down")}
                e = only.next()
                assert (e.id, e.backend, e.new_state, e.snapshot) == (v1, b2.addr4, "down", False)
                assert e.panic, "v1's only backend is down: every backend serves"
            e = only.next()
            assert (e.id, e.new_state) == (v1, "up")
            got = {(every.next().id.address, "up") for _ in range(2)}
            assert got == {(v1.address, "up"), (v2.address, "up")}
        finally:
            only.close()
            every.close()


@pytest.mark.parametrize("request_, code", [
    (pb.WatchHealthRequest(id=pb.VipId(address="198.18.10.99", port=80, protocol="tcp")), grpc.StatusCode.NOT_FOUND),
    (pb.WatchHealthRequest(id=pb.VipId(address="198.18.10.300", port=80, protocol="tcp")),
     grpc.StatusCode.INVALID_ARGUMENT),
    (pb.WatchHealthRequest(id=pb.VipId(address="198.18.10.10", port=80, protocol="sctp")),
     grpc.StatusCode.INVALID_ARGUMENT),
], ids=["unknown-vip", "bad-address", "bad-protocol"])
def test_a_bad_watch_request_is_refused_in_one_line(bed, lb, request_, code):
    with Client(bed.lb.grpc_address) as c:
        with pytest.raises(grpc.RpcError) as e:
            next(c.stub.WatchHealth(request_, timeout=10))
    assert e.value.code() == code
    assert "\n" not in e.value.details() and len(e.value.details()) < 300


def _wait_for(pred, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_the_watch_command_prints_transitions_and_follows_a_restart(bed, lb, tmp_path):
    vid = vip_id(bed.vip4(15))
    b3 = bed.backends[2]
    addrs = [b.addr4 for b in bed.backends]
    out, err = tmp_path / "watch.out", tmp_path / "watch.err"
    with checked(lb, vid, addrs):
        watch = subprocess.Popen([L4LB, "health", "--watch", f"{vid.address}:80/tcp", "--server", bed.lb.grpc_address],
                                 stdout=open(out, "w"), stderr=open(err, "w"))
        try:
            _wait_for(lambda: out.read_text().count(" up (since ") == 3, f"no snapshot: {out.read_text()}")
            with server_stopped(bed, b3):
                _wait_for(lambda: f"{b3.addr4}  up -> down (" in out.read_text(), f"no transition: {out.read_text()}")
            _wait_for(lambda: f"{b3.addr4}  down -> up (connected)" in out.read_text(),
                      f"no way back: {out.read_text()}")
            bed.lb.stop()
            _wait_for(lambda: "lost the server" in err.read_text(), f"no word of the lost server: {err.read_text()}")
            seen = out.read_text()
            with server_stopped(bed, b3):
                bed.lb.start()
                bed.lb.wait_healthy()
                lb.reconnect()
                # live, or from the snapshot after the reconnect: either way one line says it
                _wait_for(lambda: out.read_text().count(f"{b3.addr4}  up -> down (") == 2,
                          f"no transition after the restart: {out.read_text()[len(seen):]} / {err.read_text()}")
                assert "reconnected" in err.read_text()
            assert watch.poll() is None, err.read_text()
            watch.send_signal(signal.SIGINT)
            assert watch.wait(timeout=10) == 130
            assert "Traceback" not in err.read_text()
            assert len(err.read_text().splitlines()) == 2, err.read_text()  # lost, reconnected
        finally:
            if watch.poll() is None:
                watch.kill()
            if bed.lb.proc.poll() is not None:
                bed.lb.start()
                bed.lb.wait_healthy()
                lb.reconnect()


def test_a_flapping_server_changes_the_table_no_more_often_than_the_counts_allow(bed, lb):
    """b1's server flaps faster than rise/fall (and now and then stays put long
    enough to count): every transition comes after `fall` failures or `rise`
    successes in a row, so two transitions are at least (count - 1) probe
    intervals apart, and they alternate."""
    from test_health import PORT, Listener  # noqa: PLC0415

    check = pb.HealthCheck(kind="tcp", port=PORT, interval=0.3, timeout=0.2, rise=3, fall=3)
    vid = vip_id(bed.vip4(5))
    addrs = [b.addr4 for b in bed.backends]
    listeners = [Listener(b) for b in bed.backends]
    for ls in listeners:
        ls.start()
    flap = random.Random(11)
    try:
        with lb.vip(vid.address, {a: 1 for a in addrs}):
            lb.call("SetHealthCheck", pb.SetHealthCheckRequest(id=vid, health=check))
            deadline = time.monotonic() + WAIT
            while {(b.health, b.last_result) for b in lb.call("GetVip", pb.GetVipRequest(id=vid)).backends} != \
                    {("up", "connected")}:
                assert time.monotonic() < deadline, "the backends did not come up"
                time.sleep(0.05)
            w = Watch(bed.lb.grpc_address, pb.WatchHealthRequest(id=vid))
            try:
                for phase in ("flap", "down", "flap", "up", "flap"):
                    if phase == "flap":
                        end = time.monotonic() + 2.5
                        while time.monotonic() < end:
                            (listeners[0].stop if listeners[0].sock else listeners[0].start)()
                            time.sleep(flap.uniform(0.05, 0.4))
                    elif phase == "down":
                        if listeners[0].sock:
                            listeners[0].stop()
                        time.sleep(6 * check.interval)
                    else:
                        if not listeners[0].sock:
                            listeners[0].start()
                        time.sleep(6 * check.interval)
                if not listeners[0].sock:
                    listeners[0].start()
                time.sleep(6 * check.interval)  # up for good: the last transition, if any, comes
                events = []
                while not w.events.empty():
                    events.append(w.next())
            finally:
                w.close()
            assert {e.backend for e in events} <= {addrs[0]} and len(events) >= 2, events
            assert all(a.new_state == b.old_state and a.new_state != b.new_state for a, b in zip(events, events[1:]))
            for a, b in zip(events, events[1:]):
                count = check.rise if b.new_state == "up" else check.fall
                assert b.time - a.time >= (count - 1) * check.interval - 0.15, (a, b)
            assert events[-1].new_state == "up"
            assert picks(lb, bed, vid) == set(addrs)
    finally:
        for ls in listeners:
            ls.stop()


@contextlib.contextmanager
def decap_removed(b):
    """Backend b stops decapsulating (its server still runs, its VIPs stay on lo)."""
    b.run(b.program.detach)
    try:
        yield
    finally:
        b.run(b.program.attach, "eth0", "native")


def test_without_decapsulation_the_tunnel_route_says_down_and_the_direct_route_up(bed, lb):
    b1 = bed.backends[0]
    if b1.decap != "xdp":
        pytest.skip("takes the XDP decapsulation program away; the ipip devices' case is the same")
    vid = vip_id(bed.vip4(6))
    addrs = [b.addr4 for b in bed.backends]
    with checked(lb, vid, addrs):
        w = Watch(bed.lb.grpc_address, pb.WatchHealthRequest(id=vid))
        try:
            with decap_removed(b1):
                e = w.next()
                assert (e.backend, e.new_state) == (b1.addr4, "down"), e
                assert "no answer" in e.reason, e.reason
                direct = pb.HealthCheck()
                direct.CopyFrom(CHECK)
                direct.via = "direct"
                lb.call("SetHealthCheck", pb.SetHealthCheckRequest(id=vid, health=direct))
                time.sleep(6 * CHECK.interval)
                v = lb.call("GetVip", pb.GetVipRequest(id=vid))
                b = next(b for b in v.backends if b.address == b1.addr4)
                assert (b.health, b.last_result) == ("up", "connected"), "the direct route cannot see the tunnel"
        finally:
            w.close()
