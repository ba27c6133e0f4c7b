"""Established connections across changes: backends added, drained and
removed around them, and the control plane restarted under them."""
from __future__ import annotations

from control.l4lb.v1 import l4lb_pb2 as pb
from e2e_util import by_backend, close_all, open_many


def test_long_lived_connection_survives_backend_changes_and_a_control_plane_restart(bed, lb):
    b1, b2, b3 = bed.backends[:3]
    with lb.vip(bed.vip4(1), {b1.addr4: 1, b2.addr4: 1}) as vid:
        conns = open_many(bed, vid.address, 20)
        keep = [c for c in conns if c.backend == b1.role]
        close_all(c for c in conns if c not in keep)
        assert keep, "20 connections, none on b1 (probability 1e-6)"

        def still(step: str) -> None:
            for c in keep:
                assert c.ask(f"still there after {step}") == b1.role, f"{c} after {step}"

        lb.call("AddBackends", pb.AddBackendsRequest(id=vid, backends=[pb.Backend(address=b3.addr4, weight=1)]))
        still("adding b3")
        assert b3.role in by_backend(open_many(bed, vid.address, 20)), "new connections reach the new backend"
        lb.call("SetBackendWeights", pb.SetBackendWeightsRequest(
            id=vid, backends=[pb.Backend(address=b2.addr4, weight=0)]))
        still("draining b2")
        lb.call("RemoveBackends", pb.RemoveBackendsRequest(id=vid, addresses=[b2.addr4]))
        still("removing b2")
        lb.call("AddBackends", pb.AddBackendsRequest(id=vid, backends=[pb.Backend(address=b2.addr4, weight=3)]))
        still("adding b2 back")
        lb.call("RemoveBackends", pb.RemoveBackendsRequest(id=vid, addresses=[b3.addr4]))
        still("removing b3")

        before = lb.backends(vid)
        prog = bed.lb.program()
        bed.lb.stop()
        assert bed.lb.program() == prog, "the program stays attached while the control plane is down"
        still("stopping the control plane")
        new = bed.clients[0].connect(vid.address)
        assert new.ask() in (b1.role, b2.role), "new connections are served while it is down"
        bed.lb.start()
        bed.lb.wait_healthy()
        lb.reconnect()
        still("a restart of the control plane")
        assert new.ask() == new.backend
        assert bed.lb.program() == prog, "the restarted control plane adopted the running program"
        assert lb.backends(vid) == before
        close_all(keep + [new])


def test_drained_backend_gets_no_new_connections_and_keeps_its_established_ones(bed, lb):
    weights = {b.addr4: 1 for b in bed.backends}
    drained = bed.backends[1]
    with lb.vip(bed.vip4(2), weights) as vid:
        old = open_many(bed, vid.address, 60)
        on_drained = [c for c in old if c.backend == drained.role]
        assert on_drained, "60 connections over 3 backends, none on one of them (probability 3e-11)"
        lb.call("SetBackendWeights", pb.SetBackendWeightsRequest(
            id=vid, backends=[pb.Backend(address=drained.addr4, weight=0)]))
        assert lb.backends(vid)[drained.addr4] == 0
        new = open_many(bed, vid.address, 150)
        assert by_backend(new)[drained.role] == 0, "a drained backend gets no new connection"
        after = {a: w for a, w in weights.items() if a != drained.addr4}
        for c in new:
            assert bed.backend(c.backend).addr4 == lb.predict(vid, c.src, c.sport, after)
        for c in old:
            assert c.ask("after the drain") == c.backend, f"{c} moved"
            assert lb.lookup(c.src, vid.address, c.sport, vid.port) == bed.backend(c.backend).addr4
        close_all(old + new)
