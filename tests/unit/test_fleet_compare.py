"""`l4lb status --server A --server B`: how the digests of several nodes are
compared (a VIP missing on a node, or with another ring or backend set, is
named with the nodes on each side; equal VIPs are not)."""
from control.fleet_cli import compare
from control.l4lb.v1 import l4lb_pb2 as pb


def status(*vips):
    return pb.Status(digests=[pb.VipDigest(id=pb.VipId(address=a, port=80, protocol="tcp"), ring=r, backends=b)
                              for a, r, b in vips])


def test_equal_nodes_have_no_differences():
    s = status(("198.18.10.10", "r1", "b1"), ("fd00:198:18:10::10", "r2", "b2"))
    assert compare({"A": s, "B": s, "C": s}) == []


def test_a_vip_with_another_ring_is_named_with_the_nodes_on_each_side():
    a = status(("198.18.10.10", "r1", "b1"), ("198.18.10.11", "r3", "b3"))
    b = status(("198.18.10.10", "r9", "b1"), ("198.18.10.11", "r3", "b3"))
    diff = compare({"A": a, "B": b, "C": a})
    assert [v for v, _ in diff] == ["198.18.10.10:80/tcp"]
    assert "ring r1 backends b1 on A, C" in diff[0][1] and "ring r9 backends b1 on B" in diff[0][1]


def test_a_vip_missing_on_a_node_is_named():
    a = status(("198.18.10.10", "r1", "b1"), ("fd00:198:18:10::10", "r2", "b2"))
    b = status(("198.18.10.10", "r1", "b1"))
    assert compare({"A": a, "B": b}) == [("[fd00:198:18:10::10]:80/tcp", "missing on B")]
