"""Streaming calls against the real `l4lb run`: they never take the threads
unary calls need, a stream whose client went frees its slot at once, SIGTERM
ends the process within seconds whatever is open, and `l4lb stats --watch`
reconnects when the server comes back."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from contextlib import ExitStack

import grpc
import pytest

from control.client import Client
from control.l4lb.v1 import l4lb_pb2 as pb
from control.server import MAX_STREAMS
from test_server import L4LB, Server, server  # noqa: F401  (module-scoped fixture)

pytestmark = pytest.mark.kernel
FOREVER = pb.WatchStatsRequest(interval_seconds=3600)


def _open_streams(stack: ExitStack, s: Server, n: int) -> list:
    streams = []
    for _ in range(n):
        c = stack.enter_context(Client(f"unix:{s.sock}"))
        st = c.stub.WatchStats(FOREVER, timeout=120)
        next(st)  # the first message: the stream holds its thread now
        streams.append(st)
    return streams


def _unary_calls_answer(s: Server, n: int = 20) -> None:
    with Client(f"unix:{s.sock}", timeout=2) as c:
        for _ in range(n):
            c.call("GetStatus", pb.GetStatusRequest())
            c.call("ListVips", pb.ListVipsRequest())


def test_open_streams_leave_workers_for_unary_calls(server):  # noqa: F811
    with ExitStack() as stack:
        streams = _open_streams(stack, server, MAX_STREAMS)
        _unary_calls_answer(server)
        with Client(f"unix:{server.sock}") as c:  # one stream more is refused, with a message
            with pytest.raises(grpc.RpcError) as e:
                next(c.stub.WatchStats(FOREVER, timeout=5))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "streaming calls are open" in e.value.details()
        _unary_calls_answer(server)
        for st in streams:
            st.cancel()


ABANDON = """
import sys, time
from control.client import Client
from control.l4lb.v1 import l4lb_pb2 as pb
clients = [Client(sys.argv[1]) for _ in range(int(sys.argv[2]))]
streams = [c.stub.WatchStats(pb.WatchStatsRequest(interval_seconds=3600)) for c in clients]
for st in streams:
    next(st)
print("open", flush=True)
time.sleep(600)
"""


def test_streams_of_a_client_that_vanished_free_their_slots(server):  # noqa: F811
    proc = subprocess.Popen([sys.executable, "-c", ABANDON, f"unix:{server.sock}", str(MAX_STREAMS)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "open"
        _unary_calls_answer(server, 2)
    finally:
        proc.kill()  # no cancel, no goodbye: the connection just closes
        proc.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            with ExitStack() as stack:
                for st in _open_streams(stack, server, MAX_STREAMS):
                    st.cancel()
            break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() < deadline, "the vanished client's streams still hold their slots"
            time.sleep(0.2)
    _unary_calls_answer(server)


def test_sigterm_ends_the_process_at_once_with_streams_open(tmp_path):
    s = Server(tmp_path)
    try:
        s.start()
        with ExitStack() as stack:
            streams = _open_streams(stack, s, MAX_STREAMS)
            abandoned = subprocess.Popen([sys.executable, "-c", ABANDON, f"unix:{s.sock}", "2"],
                                         stdout=subprocess.PIPE, text=True)
            stack.callback(abandoned.wait)
            stack.callback(abandoned.kill)
            abandoned.stdout.readline()  # whatever it got: open streams, or refused ones
            t0 = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            s.proc.wait(timeout=15)
            assert time.monotonic() - t0 < 6
            for st in streams:  # each stream ended with a status that says why
                with pytest.raises(grpc.RpcError) as e:
                    next(st)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        s.cleanup()


def _wait_for(pred, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_stats_watch_reconnects_when_the_server_restarts(tmp_path):
    s = Server(tmp_path)
    out, err = tmp_path / "watch.out", tmp_path / "watch.err"
    watch = None
    try:
        s.start()
        watch = subprocess.Popen([L4LB, "stats", "--watch", "--interval", "0.2", "--server", f"unix:{s.sock}"],
                                 stdout=open(out, "w"), stderr=open(err, "w"))
        _wait_for(lambda: out.read_text().count("data plane") >= 2, "no stats streamed")
        s.stop()
        _wait_for(lambda: "lost the server" in err.read_text(), f"no word of the lost server: {err.read_text()}")
        assert watch.poll() is None, err.read_text()
        time.sleep(1.5)  # a few attempts while the server is down: still one line
        assert len(err.read_text().splitlines()) == 1, err.read_text()
        seen = out.read_text().count("data plane")
        s.start()
        _wait_for(lambda: out.read_text().count("data plane") > seen + 1, "no stats after the restart")
        assert "reconnected" in err.read_text()
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=10) == 130
        assert "Traceback" not in err.read_text()
    finally:
        if watch and watch.poll() is None:
            watch.kill()
        s.cleanup()


def test_health_watches_take_stream_slots_free_them_and_end_at_sigterm(tmp_path):
    s = Server(tmp_path)
    try:
        s.start()
        with ExitStack() as stack:
            watches = []
            for _ in range(MAX_STREAMS):
                c = stack.enter_context(Client(f"unix:{s.sock}"))
                w = c.stub.WatchHealth(pb.WatchHealthRequest(snapshot=True), timeout=120)
                w.initial_metadata()  # sent once the watch is registered: the stream holds its slot
                assert not w.done()
                watches.append(w)
            _unary_calls_answer(s)
            with Client(f"unix:{s.sock}") as c:
                with pytest.raises(grpc.RpcError) as e:
                    next(c.stub.WatchHealth(pb.WatchHealthRequest(), timeout=5))
                assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            watches.pop().cancel()
            deadline = time.monotonic() + 10
            while True:  # the cancelled watch's slot comes back
                try:
                    stats = stack.enter_context(Client(f"unix:{s.sock}")).stub.WatchStats(FOREVER, timeout=120)
                    next(stats)
                    break
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert time.monotonic() < deadline, "a cancelled watch still holds its slot"
                    time.sleep(0.2)
            t0 = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            s.proc.wait(timeout=15)
            assert time.monotonic() - t0 < 6
            for w in watches:
                with pytest.raises(grpc.RpcError) as e:
                    next(w)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "stopping" in e.value.details()
    finally:
        s.cleanup()


def test_a_watch_of_a_vip_ends_when_the_vip_is_deleted(server):  # noqa: F811
    """A watch of one VIP ends with NOT_FOUND once a commit deletes it; a
    watch of every VIP goes on."""
    vid = pb.VipId(address="198.18.10.171", port=80, protocol="tcp")
    with Client(f"unix:{server.sock}") as c:
        c.call("AddVip", pb.AddVipRequest(id=vid, backends=[pb.Backend(address="198.18.2.171", weight=1)]))
        one = c.stub.WatchHealth(pb.WatchHealthRequest(id=vid), timeout=60)
        every = c.stub.WatchHealth(pb.WatchHealthRequest(), timeout=60)
        one.initial_metadata()  # both are registered
        every.initial_metadata()
        try:
            c.call("DeleteVip", pb.DeleteVipRequest(id=vid))
            with pytest.raises(grpc.RpcError) as e:
                next(one)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert e.value.details() == "VIP 198.18.10.171:80/tcp was deleted"
            time.sleep(0.5)
            assert not every.done()
        finally:
            one.cancel()
            every.cancel()
