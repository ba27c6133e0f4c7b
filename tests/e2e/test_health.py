"""Health checks run by `l4lb run` itself, end to end: real probes through the
tunnel (or to the backend's own address) against listeners in the backends'
namespaces. A backend whose listener stops leaves the ring within fall ×
interval (+ one timeout) and comes back after rise × interval; below the
panic threshold every backend serves again; a restart of the control plane
invents no transition and keeps the tables; the tunnel route fails where the
backend does not own the VIP while the direct route does not notice."""
from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from control.l4lb.v1 import l4lb_pb2 as pb
from e2e_util import close_all, open_many, vip_id

PORT = 8081  # the checks' port; the testbed's own server holds 80
CHECK = dict(kind="tcp", port=PORT, interval=0.3, timeout=0.2, rise=2, fall=2)
SLACK = 3.0  # a probe round, the commit, the poll below, and a loaded CI machine


class Listener:
    """A TCP listener on PORT in a backend's namespace that accepts and closes."""

    def __init__(self, backend):
        self.backend = backend
        self.sock = None

    def start(self):
        def make():
            s = socket.socket(socket.AF_INET6)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(("::", PORT))
            s.listen(64)
            return s
        self.sock = self.backend.run(make)
        sock = self.sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    @staticmethod
    def _accept(sock):
        while True:
            try:
                c, _ = sock.accept()
            except OSError:
                return
            c.close()

    def stop(self):
        if self.sock:
            self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            self.sock = None


@pytest.fixture(scope="module")
def listeners(bed):
    ls = [Listener(b) for b in bed.backends]
    for ls_ in ls:
        ls_.start()
    yield ls
    for ls_ in ls:
        ls_.stop()


def states(lb, vid) -> dict[str, str]:
    return {b.address: b.health for b in lb.call("GetVip", pb.GetVipRequest(id=vid)).backends}


def wait(cond, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")


@contextlib.contextmanager
def checked_vip(lb, vid, addrs):
    """A VIP on addrs with the fast check, every backend up; deleted afterwards."""
    with lb.vip(vid.address, {a: 1 for a in addrs}):
        lb.call("SetHealthCheck", pb.SetHealthCheckRequest(id=vid, health=pb.HealthCheck(**CHECK)))
        # up, and probed: the first tunnel check loads the tc program first (seconds), and a
        # timing measured before the probes run would count that load
        wait(lambda: {(b.health, b.last_result) for b in lb.call("GetVip", pb.GetVipRequest(id=vid)).backends}
             == {("up", "connected")}, 20, "every backend up and probed")
        yield


def picks(lb, bed, vid, n: int = 150) -> set[str]:
    return {lb.lookup(bed.clients[0].addr4, vid.address, 20000 + i, 80) for i in range(n)}


def test_a_stopped_server_leaves_the_ring_and_comes_back(bed, lb, listeners):
    vid = vip_id(bed.vip4(7))
    addrs = [b.addr4 for b in bed.backends]
    with checked_vip(lb, vid, addrs):
        assert picks(lb, bed, vid) == set(addrs)
        listeners[0].stop()
        took = wait(lambda: states(lb, vid)[addrs[0]] == "down", 10, "b1 down")
        assert took <= CHECK["fall"] * CHECK["interval"] + CHECK["timeout"] + SLACK
        v = lb.call("GetVip", pb.GetVipRequest(id=vid))
        b1 = next(b for b in v.backends if b.address == addrs[0])
        assert (b1.weight, b1.effective_weight) == (1, 0)  # the operator's weight is kept apart
        assert not v.panic
        assert picks(lb, bed, vid) == set(addrs[1:]), "new flows avoid the down backend"
        listeners[0].start()
        took = wait(lambda: states(lb, vid)[addrs[0]] == "up", 10, "b1 up again")
        assert took <= CHECK["rise"] * CHECK["interval"] + SLACK
        assert picks(lb, bed, vid) == set(addrs)


def test_below_the_panic_threshold_every_backend_serves(bed, lb, listeners):
    vid = vip_id(bed.vip4(8))
    addrs = [b.addr4 for b in bed.backends]
    with checked_vip(lb, vid, addrs):
        listeners[0].stop()
        listeners[1].stop()
        try:
            wait(lambda: list(states(lb, vid).values()).count("down") == 2, 10, "two backends down")
            v = lb.call("GetVip", pb.GetVipRequest(id=vid))
            assert v.panic
            assert all(b.effective_weight == 1 for b in v.backends)
            assert picks(lb, bed, vid) == set(addrs), "in panic every backend serves"
            conns = open_many(bed, vid.address, 30)  # real connections to the service's port (80)
            try:
                assert {c.backend for c in conns} == {b.role for b in bed.backends}
            finally:
                close_all(conns)
            assert "enters panic" in bed.lb.log_tail(200)
            assert list(lb.call("GetStatus", pb.GetStatusRequest()).panic) == [f"{vid.address}:{vid.port}/{vid.protocol}"]
        finally:
            listeners[0].start()
            listeners[1].start()
        wait(lambda: set(states(lb, vid).values()) == {"up"}, 10, "every backend up again")
        assert not lb.call("GetVip", pb.GetVipRequest(id=vid)).panic
        assert not lb.call("GetStatus", pb.GetStatusRequest()).panic


def test_a_restart_invents_no_transition_and_keeps_the_tables(bed, lb, listeners):
    vid = vip_id(bed.vip4(9))
    addrs = [b.addr4 for b in bed.backends]
    with checked_vip(lb, vid, addrs):
        listeners[2].stop()
        try:
            wait(lambda: states(lb, vid)[addrs[2]] == "down", 10, "b3 down")
            before = (states(lb, vid), picks(lb, bed, vid))
            lines = bed.lb.log_tail(10000).count("health: VIP")
            bed.lb.restart()
            lb.reconnect()
            assert (states(lb, vid), picks(lb, bed, vid)) == before
            time.sleep(6 * CHECK["interval"])
            assert bed.lb.log_tail(10000).count("health: VIP") == lines, "a restart logged a transition"
            assert (states(lb, vid), picks(lb, bed, vid)) == before
        finally:
            listeners[2].start()
        wait(lambda: states(lb, vid)[addrs[2]] == "up", 10, "b3 up after the restart")


def test_the_tunnel_route_proves_the_vip_where_the_direct_route_cannot(bed, lb, listeners):
    vid = vip_id(bed.vip4(10))
    b1 = bed.backends[0]
    addrs = [b.addr4 for b in bed.backends]
    with checked_vip(lb, vid, addrs):
        lo = b1.index("lo")
        b1.ipr.addr("del", index=lo, address=vid.address, prefixlen=32)
        try:
            wait(lambda: states(lb, vid)[b1.addr4] == "down", 10, "b1 down through the tunnel")
            lb.call("SetHealthCheck", pb.SetHealthCheckRequest(
                id=vid, health=pb.HealthCheck(**CHECK, via="direct")))
            time.sleep(4 * CHECK["interval"])
            assert states(lb, vid)[b1.addr4] == "up", "the direct route does not see the missing VIP"
        finally:
            b1.ipr.addr("add", index=lo, address=vid.address, prefixlen=32)


@pytest.mark.parametrize("check, message", [
    (dict(kind="udp"), "health.kind"),
    (dict(kind="tcp", interval=0.5, timeout=2.0), "longer than the interval"),
    (dict(kind="tcp", rise=1000), "health.rise"),
    (dict(kind="tcp", path="/x"), "only for kind http"),
    (dict(kind="http", path="no-slash"), "health.path"),
    (dict(kind="tcp", via="carrier-pigeon"), "health.via"),
])
def test_bad_checks_are_refused_and_change_nothing(bed, lb, check, message):
    import grpc

    vid = vip_id(bed.vip4(11))
    with lb.vip(vid.address, {bed.backends[0].addr4: 1}):
        before = lb.call("GetVip", pb.GetVipRequest(id=vid))
        with pytest.raises(grpc.RpcError) as e:
            lb.call("SetHealthCheck", pb.SetHealthCheckRequest(id=vid, health=pb.HealthCheck(**check)))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()
        assert lb.call("GetVip", pb.GetVipRequest(id=vid)) == before
