"""Validation at the gRPC boundary of the real server: zones and other
second spellings of an address are refused (two API VIPs must never share one
map key), LookupFlow refuses them too, and a huge value gets a short
INVALID_ARGUMENT, not RESOURCE_EXHAUSTED."""
from __future__ import annotations

import grpc
import pytest

from control.l4lb.v1 import l4lb_pb2 as pb
from test_server import server  # noqa: F401  (module-scoped fixture)

pytestmark = pytest.mark.kernel
V6 = "fd00:198:18:10::30"


def _refused(c, rpc, req, *words):
    with pytest.raises(grpc.RpcError) as e:
        c.call(rpc, req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert all(w in e.value.details() for w in words), e.value.details()
    return e.value.details()


def test_zoned_vips_are_refused_and_cannot_blackhole_each_other(server):  # noqa: F811
    with server.client() as c:
        c.call("SetGateway", pb.SetGatewayRequest(mac="02:00:00:00:00:01"))
        for zone in ("%a", "%b"):
            _refused(c, "AddVip", pb.AddVipRequest(id=pb.VipId(address=V6 + zone, port=80, protocol="tcp"),
                                                   backends=[pb.Backend(address="fd00:198:18:2::1", weight=1)]), "zone")
        vid = pb.VipId(address=V6.upper(), port=80, protocol="tcp")  # another spelling: stored canonical
        v = c.call("AddVip", pb.AddVipRequest(id=vid, backends=[pb.Backend(address="FD00:198:18:2::1", weight=1)]))
        assert v.id.address == V6 and [b.address for b in v.backends] == ["fd00:198:18:2::1"]
        _refused(c, "DeleteVip", pb.DeleteVipRequest(id=pb.VipId(address=V6 + "%a", port=80, protocol="tcp")), "zone")
        r = c.call("LookupFlow", pb.LookupFlowRequest(src="fd00:198:18::5", dst=V6, sport=1, dport=80, protocol="tcp"))
        assert (r.verdict, r.backend) == ("TX", "fd00:198:18:2::1")
        c.call("DeleteVip", pb.DeleteVipRequest(id=pb.VipId(address="fd00:198:18:10:0:0:0:30", port=80, protocol="tcp")))


@pytest.mark.parametrize("src, dst", [("fd00:198:18::5%a", V6), ("fd00:198:18::5", V6 + "%eth0"),
                                      ("198.18.0.010", "198.18.10.10")])
def test_lookup_flow_refuses_what_is_not_one_address(server, src, dst):  # noqa: F811
    with server.client() as c:
        _refused(c, "LookupFlow", pb.LookupFlowRequest(src=src, dst=dst, sport=1, dport=80, protocol="tcp"))


@pytest.mark.parametrize("address, words", [
    ("255.255.255.255", ["broadcast"]), ("127.0.0.1", ["loopback"]), ("169.254.0.1", ["link-local"]),
    ("224.0.0.1", ["multicast"]), ("0.0.0.0", ["unspecified"]), ("::ffff:198.18.10.10", ["IPv4-mapped"]),
])
def test_vips_and_backends_must_be_reachable_hosts(server, address, words):  # noqa: F811
    with server.client() as c:
        _refused(c, "AddVip", pb.AddVipRequest(id=pb.VipId(address=address, port=80, protocol="tcp")), *words)
        _refused(c, "AddVip", pb.AddVipRequest(id=pb.VipId(address="198.18.10.40", port=80, protocol="tcp"),
                                               backends=[pb.Backend(address=address, weight=1)]), *words)
        _refused(c, "AddVip", pb.AddVipRequest(id=pb.VipId(address="198.18.10.40", port=80, protocol="tcp"),
                                               backends=[pb.Backend(address="198.18.10.40", weight=1)]), "VIP itself")
        assert not c.call("ListVips", pb.ListVipsRequest()).vips


@pytest.mark.parametrize("mac", ["00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01"])
def test_the_gateway_mac_must_be_one_station(server, mac):  # noqa: F811
    with server.client() as c:
        _refused(c, "SetGateway", pb.SetGatewayRequest(mac=mac), mac)


@pytest.mark.parametrize("make", [
    lambda huge: ("AddVip", pb.AddVipRequest(id=pb.VipId(address=huge, port=80, protocol="tcp"))),
    lambda huge: ("AddVip", pb.AddVipRequest(id=pb.VipId(address="198.18.10.41", port=80, protocol=huge))),
    lambda huge: ("AddVip", pb.AddVipRequest(id=pb.VipId(address="198.18.10.41", port=80, protocol="tcp"), flags=[huge])),
    lambda huge: ("AddVip", pb.AddVipRequest(id=pb.VipId(address="198.18.10.41", port=80, protocol="tcp"),
                                             backends=[pb.Backend(address=huge, weight=1)])),
    lambda huge: ("SetGateway", pb.SetGatewayRequest(mac=huge)),
    lambda huge: ("SetGateway", pb.SetGatewayRequest(ip=huge)),
    lambda huge: ("LookupFlow", pb.LookupFlowRequest(src=huge, dst="198.18.10.10", sport=1, dport=80, protocol="tcp")),
])
def test_a_huge_value_gets_a_short_invalid_argument(server, make):  # noqa: F811
    rpc, req = make("1" * 100_000)
    with server.client() as c:
        details = _refused(c, rpc, req)
        assert len(details) < 300 and "…" in details
