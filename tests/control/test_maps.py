"""After each RPC the pinned maps hold what they should: the VIP entry, the
active ring copy equal to Maglev over the backends reported by GetVip, and the
backend entries with their generations."""
from __future__ import annotations

import ipaddress
import struct

import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
import grpc

from control.l4lb.v1 import l4lb_pb2 as pb
from l4lb import libbpf
from l4lb.maglev import maglev_table
from test_server import server  # noqa: F401

pytestmark = pytest.mark.kernel
M = 65537


class Pinned:
    """Read-only access to a pinned map by raw bytes (libbpf through ctypes)."""

    def __init__(self, path: str, key_size: int, value_size: int):
        self.value_size = value_size
        self.fd = libbpf.obj_get(path)

    def get(self, key: bytes) -> bytes | None:
        return libbpf.map_lookup(self.fd, key, self.value_size)


def vip_key(addr: str, port: int, proto: int) -> bytes:
    a = ipaddress.ip_address(addr)
    return a.packed.ljust(16, b"\0") + port.to_bytes(2, "big") + bytes([proto, 4 if a.version == 4 else 6])


def test_maps_follow_every_change(server):  # noqa: F811
    pin = f"/sys/fs/bpf/l4lb/{server.ifname}"
    vips, rings, backends = Pinned(f"{pin}/vips", 20, 16), Pinned(f"{pin}/rings", 4, 4 * M), Pinned(f"{pin}/backends", 4, 32)  # max_vips 8: one word of VIP bits
    vid = pb.VipId(address="198.18.10.80", port=80, protocol="tcp")

    def check(expect_backends: dict[str, int]):
        with server.client() as c:
            v = c.call("GetVip", pb.GetVipRequest(id=vid))
        assert {b.address: b.weight for b in v.backends} == expect_backends
        raw = vips.get(vip_key(vid.address, 80, 6))
        vip_id, flags, ring, _ = struct.unpack("<IIII", raw)
        assert vip_id == v.vip_id
        slots = np.frombuffer(rings.get(struct.pack("<I", 2 * vip_id + ring)), dtype=np.uint32)
        # backend index -> address, from the backends map
        index_addr = {}
        for idx in set(slots.tolist()) - {0}:
            b = backends.get(struct.pack("<I", idx))
            fam, bflags = b[20], b[21]
            assert bflags & 1, f"ring names invalid backend index {idx}"
            assert struct.unpack("<Q", b[24:32])[0] >> vip_id & 1, f"backend {idx} lacks VIP {vip_id}'s bit"
            index_addr[idx] = str(ipaddress.ip_address(b[:4] if fam == 4 else b[:16]))
        got = [index_addr.get(i) for i in slots.tolist()]
        assert got == maglev_table(expect_backends, M)
        return ring

    with server.client() as c:
        c.call("AddVip", pb.AddVipRequest(id=vid, backends=[pb.Backend(address="198.18.2.1", weight=1)]))
        r0 = check({"198.18.2.1": 1})
        c.call("AddBackends", pb.AddBackendsRequest(id=vid, backends=[pb.Backend(address="198.18.2.2", weight=2),
                                                                      pb.Backend(address="fd00:198:18:2::2", weight=1)]))
        r1 = check({"198.18.2.1": 1, "198.18.2.2": 2, "fd00:198:18:2::2": 1})
        assert r1 != r0  # the idle copy was written and flipped to
        c.call("SetBackendWeights", pb.SetBackendWeightsRequest(id=vid, backends=[pb.Backend(address="198.18.2.1", weight=0)]))
        check({"198.18.2.1": 0, "198.18.2.2": 2, "fd00:198:18:2::2": 1})
        c.call("RemoveBackends", pb.RemoveBackendsRequest(id=vid, addresses=["198.18.2.2"]))
        check({"198.18.2.1": 0, "fd00:198:18:2::2": 1})
        c.call("ModifyVip", pb.ModifyVipRequest(id=vid, flags=["no_source_port", "no_conntrack"]))
        assert struct.unpack("<IIII", vips.get(vip_key(vid.address, 80, 6)))[1] == 3
        c.call("DeleteVip", pb.DeleteVipRequest(id=vid))
    assert vips.get(vip_key(vid.address, 80, 6)) is None


def test_reflection_lists_the_services(server):  # noqa: F811
    with grpc.insecure_channel(f"unix:{server.sock}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"l4lb.v1.LoadBalancer", "grpc.health.v1.Health"} <= names
