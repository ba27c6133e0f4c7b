"""A VIP's encapsulation (encap: ipip | gue) and the node-wide gue_port
through the real server: AddVip, ModifyVip, Apply, the CLI, the maps they
write, the saved state, and the one-line refusals that change nothing."""
from __future__ import annotations

import ctypes
import json
import os
import subprocess

import grpc
import pytest

from control.l4lb.v1 import l4lb_pb2 as pb
from l4lb import bpf, consts, libbpf
from test_server import L4LB, server  # noqa: F401  (module-scoped fixture)

pytestmark = pytest.mark.kernel
V4 = "198.18.10.70"


def _cli(server, *args):  # noqa: F811
    return subprocess.run([L4LB, *args, "--server", f"unix:{server.sock}"], capture_output=True, text=True, timeout=60)


def _refused(c, rpc, req, *words):
    with pytest.raises(grpc.RpcError) as e:
        c.call(rpc, req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert all(w in e.value.details() for w in words), e.value.details()
    assert "\n" not in e.value.details()


@pytest.fixture(scope="module")
def leaves():
    """The C layouts of vip_info and config, from a compiled program."""
    prog = bpf.load_balancer(consts.Capacity(max_vips=8, max_backends=64, ct_size=4096))
    out = {name: prog.table(name).Leaf for name in (consts.MAP_VIP_INFO, consts.MAP_CONFIG)}
    prog.close()
    return out


def _pinned(server, leaves, name, key: int):  # noqa: F811
    fd = libbpf.obj_get(f"{consts.PIN_ROOT}/{server.ifname}/{name}")
    try:
        leaf = leaves[name]
        return leaf.from_buffer_copy(libbpf.map_lookup(fd, key.to_bytes(4, "little"), ctypes.sizeof(leaf)))
    finally:
        os.close(fd)


def _vip_bits(server, leaves, vip_id: int) -> int:  # noqa: F811
    return _pinned(server, leaves, consts.MAP_VIP_INFO, vip_id).flags


def _gue_port(server, leaves) -> int:  # noqa: F811
    raw = _pinned(server, leaves, consts.MAP_CONFIG, 0).gue_port  # __be16 as stored
    return int.from_bytes(raw.to_bytes(2, "little"), "big")


def _list(c):
    return {(v.id.address, v.id.port, v.id.protocol): (v.encap, tuple(v.flags))
            for v in c.call("ListVips", pb.ListVipsRequest()).vips}


def test_add_and_modify_set_the_encapsulation_in_the_maps_and_the_saved_state(server, leaves):  # noqa: F811
    vid = pb.VipId(address=V4, port=80, protocol="tcp")
    with server.client() as c:
        v = c.call("AddVip", pb.AddVipRequest(id=vid, encap="gue", flags=["no_source_port"],
                                              backends=[pb.Backend(address="198.18.2.1", weight=1)]))
        assert v.encap == "gue"
        assert _vip_bits(server, leaves, v.vip_id) == consts.VIP_F_GUE | consts.VIP_F_NO_SPORT
        saved = json.loads((server.state / server.ifname / "state.json").read_text())
        assert [x["encap"] for x in saved["state"]["vips"] if x["address"] == V4] == ["gue"]
        # ModifyVip: flags always (the complete set), the encapsulation when given
        v = c.call("ModifyVip", pb.ModifyVipRequest(id=vid, flags=[]))
        assert (v.encap, list(v.flags)) == ("gue", [])
        assert _vip_bits(server, leaves, v.vip_id) == consts.VIP_F_GUE
        v = c.call("ModifyVip", pb.ModifyVipRequest(id=vid, flags=["no_conntrack"], encap="ipip"))
        assert (v.encap, list(v.flags)) == ("ipip", ["no_conntrack"])
        assert _vip_bits(server, leaves, v.vip_id) == consts.VIP_F_NO_CONNTRACK
        other = c.call("AddVip", pb.AddVipRequest(id=pb.VipId(address=V4, port=81, protocol="tcp"),
                                                  backends=[pb.Backend(address="198.18.2.1", weight=1)]))
        assert other.encap == "ipip" and _vip_bits(server, leaves, other.vip_id) == 0  # the default
        c.call("DeleteVip", pb.DeleteVipRequest(id=vid))
        c.call("DeleteVip", pb.DeleteVipRequest(id=other.id))


@pytest.mark.parametrize("encap", ["vxlan", "ipip ", "GUE6", "x" * 300])
def test_a_bad_encapsulation_is_refused_and_changes_nothing(server, leaves, encap):  # noqa: F811
    vid = pb.VipId(address=V4, port=90, protocol="tcp")
    with server.client() as c:
        if encap == "ipip ":  # spaces around a known name are forgiven, like other names
            v = c.call("AddVip", pb.AddVipRequest(id=vid, encap=encap))
            assert v.encap == "ipip"
            c.call("DeleteVip", pb.DeleteVipRequest(id=vid))
            return
        before = _list(c)
        _refused(c, "AddVip", pb.AddVipRequest(id=vid, encap=encap), "encap", "ipip, gue")
        assert _list(c) == before
        v = c.call("AddVip", pb.AddVipRequest(id=vid, encap="gue", flags=["no_source_port"]))
        before = _list(c)
        _refused(c, "ModifyVip", pb.ModifyVipRequest(id=vid, flags=[], encap=encap), "encap")
        assert _list(c) == before  # the flags did not change either
        assert _vip_bits(server, leaves, v.vip_id) == consts.VIP_F_GUE | consts.VIP_F_NO_SPORT
        c.call("DeleteVip", pb.DeleteVipRequest(id=vid))


def test_apply_sets_encapsulations_and_the_gue_port_or_refuses_the_whole_file(server, leaves, tmp_path):  # noqa: F811
    f = tmp_path / "lb.yaml"
    f.write_text(f"""
gue_port: 5555
vips:
  - {{address: {V4}, port: 80, protocol: tcp, encap: gue, backends: [{{address: 198.18.2.1}}]}}
  - {{address: {V4}, port: 443, protocol: tcp, backends: [{{address: 198.18.2.1}}]}}
""")
    r = _cli(server, "apply", "-f", str(f))
    assert r.returncode == 0, r.stderr
    assert "gue_port" in r.stdout
    assert _gue_port(server, leaves) == 5555
    with server.client() as c:
        assert _list(c)[(V4, 80, "tcp")][0] == "gue" and _list(c)[(V4, 443, "tcp")][0] == "ipip"
    r = _cli(server, "vip", "list")
    assert r.returncode == 0 and "encap" in r.stdout and "gue" in r.stdout
    r = _cli(server, "vip", "show", f"{V4}:80/tcp")
    assert "encap: gue" in r.stdout
    # the encapsulation changes, with the file's other changes, as one step of its own
    f.write_text(f.read_text().replace("encap: gue", "encap: ipip").replace("port: 443, protocol: tcp,",
                                                                          "port: 443, protocol: tcp, encap: gue,"))
    r = _cli(server, "apply", "-f", str(f))
    assert r.returncode == 0, r.stderr
    assert f"changed the encapsulation of {V4}:80/tcp" in r.stdout
    assert f"changed the encapsulation of {V4}:443/tcp" in r.stdout
    assert _cli(server, "apply", "-f", str(f)).stdout.strip().endswith("0 change(s) applied")
    with server.client() as c:
        before = _list(c)
    for bad, words in (("gue_port: 0", ("gue_port: 0 is out of range",)),
                       ("gue_port: 70000", ("gue_port: 70000",)),
                       ("gue_port: 5555", ("vips[0].encap: 'fou'",))):
        text = f.read_text().replace("gue_port: 5555", bad)
        if "fou" in words[0]:
            text = text.replace("encap: ipip", "encap: fou")
        f.write_text(text)
        r = _cli(server, "apply", "-f", str(f))
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
        assert all(w in r.stderr for w in words), r.stderr
        with server.client() as c:
            assert _list(c) == before
        assert _gue_port(server, leaves) == 5555
        f.write_text(text.replace(bad, "gue_port: 5555").replace("encap: fou", "encap: ipip"))
    with server.client() as c:
        for port in (80, 443):
            c.call("DeleteVip", pb.DeleteVipRequest(id=pb.VipId(address=V4, port=port, protocol="tcp")))


def test_cli_adds_a_gue_vip_and_refuses_an_unknown_encapsulation_in_one_line(server):  # noqa: F811
    r = _cli(server, "vip", "add", f"{V4}:8080/tcp", "--backend", "198.18.2.1", "--encap", "gue")
    assert r.returncode == 0, r.stderr
    assert "encap: gue" in r.stdout
    r = _cli(server, "vip", "add", f"{V4}:8081/tcp", "--encap", "ipinip")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--encap" in r.stderr
    r = _cli(server, "vip", "encap", f"{V4}:8080/tcp", "vxlan")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "vxlan" in r.stderr
    with server.client() as c:
        assert (V4, 8081, "tcp") not in _list(c)
        assert _list(c)[(V4, 8080, "tcp")] == ("gue", ())
        c.call("ModifyVip", pb.ModifyVipRequest(id=pb.VipId(address=V4, port=8080, protocol="tcp"),
                                                flags=["no_source_port"]))
    r = _cli(server, "vip", "encap", f"{V4}:8080/tcp", "ipip")
    assert r.returncode == 0 and "encap: ipip" in r.stdout, r.stderr
    with server.client() as c:
        assert _list(c)[(V4, 8080, "tcp")] == ("ipip", ("no_source_port",))  # the flags kept
        c.call("DeleteVip", pb.DeleteVipRequest(id=pb.VipId(address=V4, port=8080, protocol="tcp")))


def test_the_status_digest_tells_nodes_with_another_encapsulation_apart(server):  # noqa: F811
    vid = pb.VipId(address=V4, port=9000, protocol="tcp")

    def digest():
        with server.client() as c:
            d = [x for x in c.call("GetStatus", pb.GetStatusRequest()).digests if x.id.port == 9000]
        return d[0].ring, d[0].backends

    with server.client() as c:
        c.call("AddVip", pb.AddVipRequest(id=vid, backends=[pb.Backend(address="198.18.2.1", weight=1)]))
        ipip = digest()
        c.call("ModifyVip", pb.ModifyVipRequest(id=vid, encap="gue"))
        gue = digest()
        c.call("ModifyVip", pb.ModifyVipRequest(id=vid, encap="ipip"))
        again = digest()
        c.call("DeleteVip", pb.DeleteVipRequest(id=vid))
    assert gue[0] == ipip[0]  # the same table: new flows reach the same backends
    assert gue[1] != ipip[1]  # but not in the same packets
    assert again == ipip
