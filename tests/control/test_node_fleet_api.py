"""The fleet parts of the API on a server that runs without --announce:
SetDrain is refused with a message that says why, GetStatus says the node
announces nothing, and each VIP's digests depend on its table, not on the
order of the changes that built it."""
from __future__ import annotations

import subprocess

import grpc
import pytest

from control.l4lb.v1 import l4lb_pb2 as pb
from test_server import L4LB, server  # noqa: F401  (module-scoped fixture)

pytestmark = pytest.mark.kernel

VIP = pb.VipId(address="198.18.10.77", port=80, protocol="tcp")


def _digest(c, vid=VIP):
    for d in c.call("GetStatus", pb.GetStatusRequest()).digests:
        if (d.id.address, d.id.port, d.id.protocol) == (vid.address, vid.port, vid.protocol):
            return d.ring, d.backends
    return None


def test_drain_is_refused_on_a_node_that_announces_nothing(server):  # noqa: F811
    with server.client() as c:
        with pytest.raises(grpc.RpcError) as e:
            c.call("SetDrain", pb.SetDrainRequest(drained=True))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--announce" in e.value.details()
        st = c.call("GetStatus", pb.GetStatusRequest())
        assert st.announce_table == 0 and not st.drained and list(st.announced) == []
    r = subprocess.run([L4LB, "node", "drain", "--server", f"unix:{server.sock}"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "FAILED_PRECONDITION" in r.stderr


def test_digests_follow_the_table_not_the_order_of_changes(server):  # noqa: F811
    with server.client() as c:
        c.call("AddVip", pb.AddVipRequest(id=VIP, backends=[pb.Backend(address=f"198.18.2.{i}", weight=1)
                                                            for i in (1, 2, 3)]))
        first = _digest(c)
        c.call("DeleteVip", pb.DeleteVipRequest(id=VIP))
        c.call("AddVip", pb.AddVipRequest(id=VIP, backends=[pb.Backend(address="198.18.2.9", weight=1)]))
        c.call("AddBackends", pb.AddBackendsRequest(id=VIP, backends=[
            pb.Backend(address=f"198.18.2.{i}", weight=1) for i in (3, 1, 2)]))
        c.call("RemoveBackends", pb.RemoveBackendsRequest(id=VIP, addresses=["198.18.2.9"]))
        assert _digest(c) == first  # other indices, other history: the same table
        c.call("SetBackendWeights", pb.SetBackendWeightsRequest(id=VIP, backends=[
            pb.Backend(address="198.18.2.1", weight=2)]))
        ring, backends = _digest(c)
        assert ring != first[0] and backends != first[1]
        c.call("DeleteVip", pb.DeleteVipRequest(id=VIP))
        assert _digest(c) is None
