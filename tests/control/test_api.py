"""More of the API against the real server: connection-table dump and flush,
streamed stats, concurrent writers, the CLI, apply, and TLS."""
from __future__ import annotations

import ctypes
import json
import os
import random
import subprocess
import threading

import grpc
import pytest

from control.l4lb.v1 import l4lb_pb2 as pb
from l4lb import bpf, consts, libbpf
from l4lb.flowhash import flow_hash, ring_slot
from l4lb.maglev import maglev_table
from test_server import L4LB, server  # noqa: F401  (module-scoped fixture)

pytestmark = pytest.mark.kernel


def _vip(c, address, port, proto, backends, flags=()):
    vid = pb.VipId(address=address, port=port, protocol=proto)
    c.call("AddVip", pb.AddVipRequest(id=vid, flags=list(flags), backends=[pb.Backend(address=a, weight=w) for a, w in backends.items()]))
    return vid


def test_flows_of_a_vip_can_be_listed_and_flushed(server):  # noqa: F811
    with server.client() as c:
        c.call("SetGateway", pb.SetGatewayRequest(mac="02:00:00:00:00:01"))
        vid = _vip(c, "198.18.10.30", 53, "udp", {"198.18.2.1": 1, "198.18.2.2": 1})
        other = _vip(c, "198.18.10.31", 53, "udp", {"198.18.2.1": 1})
        picks = {}
        for i in range(30):  # a UDP lookup behaves like the flow's packet: it creates the entry
            r = c.call("LookupFlow", pb.LookupFlowRequest(src="198.18.0.3", dst=vid.address, sport=7000 + i, dport=53, protocol="udp"))
            picks[7000 + i] = r.backend
        c.call("LookupFlow", pb.LookupFlowRequest(src="198.18.0.3", dst=other.address, sport=1, dport=53, protocol="udp"))
        r = c.call("ListFlows", pb.ListFlowsRequest(id=vid))
        assert r.total == 30
        assert {f.sport: f.backend for f in r.flows} == picks
        assert all(f.src == "198.18.0.3" and f.dst == vid.address and f.dport == 53 and not f.stale for f in r.flows)
        c.call("RemoveBackends", pb.RemoveBackendsRequest(id=vid, addresses=["198.18.2.2"]))
        r = c.call("ListFlows", pb.ListFlowsRequest(id=vid, limit=5))
        assert len(r.flows) == 5 and r.total == 30
        stale = [f for f in c.call("ListFlows", pb.ListFlowsRequest(id=vid)).flows if f.stale]
        assert len(stale) == sum(1 for b in picks.values() if b == "198.18.2.2") > 0
        assert c.call("FlushFlows", pb.FlushFlowsRequest(id=vid)).flushed == 30
        assert c.call("ListFlows", pb.ListFlowsRequest(id=vid)).total == 0
        assert c.call("ListFlows", pb.ListFlowsRequest(id=other)).total == 1  # another VIP's entries stay
        with pytest.raises(grpc.RpcError) as e:
            c.call("FlushFlows", pb.FlushFlowsRequest(id=pb.VipId(address="198.18.10.99", port=53, protocol="udp")))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        for v in (vid, other):
            c.call("DeleteVip", pb.DeleteVipRequest(id=v))


def test_watch_stats_streams_at_the_interval_and_rejects_a_bad_one(server):  # noqa: F811
    with server.client() as c:
        stream = c.stub.WatchStats(pb.WatchStatsRequest(interval_seconds=0.2), timeout=10)
        got = [next(stream) for _ in range(3)]
        stream.cancel()
        assert 0.15 < got[2].timestamp - got[1].timestamp < 1.0
        assert "tx" in got[0].counters and "pass" in got[0].counters
        with pytest.raises(grpc.RpcError) as e:
            list(c.stub.WatchStats(pb.WatchStatsRequest(interval_seconds=0.01), timeout=5))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_concurrent_writers_leave_the_ring_equal_to_maglev_of_the_reported_backends(server):  # noqa: F811
    with server.client() as c:
        c.call("SetGateway", pb.SetGatewayRequest(mac="02:00:00:00:00:01"))
        vid = _vip(c, "198.18.10.40", 80, "tcp", {"198.18.2.100": 1})
    errors = []

    def writer(n):
        rng = random.Random(n)
        with server.client() as c:
            for i in range(15):
                addr = f"198.18.2.{n * 10 + rng.randrange(8) + 1}"
                try:
                    op = rng.randrange(3)
                    if op == 0:
                        c.call("AddBackends", pb.AddBackendsRequest(id=vid, backends=[pb.Backend(address=addr, weight=rng.randrange(1, 4))]))
                    elif op == 1:
                        c.call("RemoveBackends", pb.RemoveBackendsRequest(id=vid, addresses=[addr]))
                    else:
                        c.call("SetBackendWeights", pb.SetBackendWeightsRequest(id=vid, backends=[pb.Backend(address=addr, weight=rng.randrange(0, 4))]))
                except grpc.RpcError as e:
                    if e.code() not in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.NOT_FOUND):
                        errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with server.client() as c:
        v = c.call("GetVip", pb.GetVipRequest(id=vid))
        backends = {b.address: b.weight for b in v.backends}
        table = maglev_table(backends, 65537)
        for sport in range(1024, 1524):
            r = c.call("LookupFlow", pb.LookupFlowRequest(src="198.18.0.8", dst=vid.address, sport=sport, dport=80, protocol="tcp"))
            want = table[ring_slot(flow_hash("198.18.0.8", vid.address, sport, 80, 6), 65537)]
            assert r.backend == (want or ""), (sport, r)
        c.call("DeleteVip", pb.DeleteVipRequest(id=vid))


def _cli(server, *args):  # noqa: F811
    return subprocess.run([L4LB, *args, "--server", f"unix:{server.sock}"], capture_output=True, text=True, timeout=60)


def test_cli_verbs_show_tables_and_turn_errors_into_one_line(server):  # noqa: F811
    r = _cli(server, "vip", "add", "198.18.10.50:443/tcp", "--backend", "198.18.2.1", "--backend", "198.18.2.2=3",
             "--flag", "no_source_port")
    assert r.returncode == 0, r.stderr
    assert "198.18.2.2" in r.stdout and "3" in r.stdout
    r = _cli(server, "backend", "drain", "198.18.10.50:443/tcp", "198.18.2.1")
    assert r.returncode == 0 and "draining" in r.stdout
    r = _cli(server, "vip", "list")
    assert "198.18.10.50:443/tcp" in r.stdout and "no_source_port" in r.stdout
    bad = [
        (["vip", "add", "198.18.10.50:443/tcp"], "ALREADY_EXISTS"),
        (["vip", "add", "198.18.10.51:443"], "ADDRESS[:PORT]/PROTOCOL"),
        (["vip", "show", "198.18.10.99:1/tcp"], "NOT_FOUND"),
        (["backend", "weight", "198.18.10.50:443/tcp", "198.18.2.1"], "ADDRESS=WEIGHT"),
        (["backend", "weight", "198.18.10.50:443/tcp", "198.18.2.1=x"], "whole number"),
        (["backend", "add", "198.18.10.50:443/tcp", "198.18.2.9=70000"], "out of range"),  # refused before the call
        (["backend", "add", "198.18.10.50:443/tcp", "127.0.0.1"], "INVALID_ARGUMENT"),
        (["backend", "del", "198.18.10.50:443/tcp", "198.18.2.77"], "NOT_FOUND"),
        (["lookup", "198.18.0.1", "198.18.10.50:443", "tcp"], "ADDRESS:PORT"),
        (["gateway", "nonsense"], "INVALID_ARGUMENT"),
    ]
    before = _cli(server, "vip", "show", "198.18.10.50:443/tcp").stdout
    for args, text in bad:
        r = _cli(server, *args)
        assert r.returncode != 0 and text in r.stderr, (args, r.stderr)
        assert r.stderr.strip().count("\n") == 0, r.stderr
    assert _cli(server, "vip", "show", "198.18.10.50:443/tcp").stdout == before
    assert _cli(server, "vip", "del", "198.18.10.50:443/tcp").returncode == 0


def test_apply_makes_the_running_state_equal_the_file_and_is_idempotent(server, tmp_path):  # noqa: F811
    f = tmp_path / "lb.yaml"
    f.write_text("""
gateway_mac: "02:00:00:00:00:02"
vips:
  - {address: 198.18.10.60, port: 80, protocol: tcp, backends: [{address: 198.18.2.1, weight: 2}, {address: 198.18.2.2}]}
  - {address: "fd00:198:18:10::60", protocol: udp, flags: [no_conntrack], backends: [{address: "fd00:198:18:2::1"}]}
""")
    r = _cli(server, "apply", "-f", str(f))
    assert r.returncode == 0, r.stderr
    assert "3 change(s)" in r.stdout and "set gateway_mac" in r.stdout  # two VIPs and the gateway
    assert _cli(server, "apply", "-f", str(f)).stdout.strip().endswith("0 change(s) applied")
    f.write_text("""
vips:
  - {address: 198.18.10.60, port: 80, protocol: tcp, backends: [{address: 198.18.2.1, weight: 1}, {address: 198.18.2.3}]}
""")
    r = _cli(server, "apply", "-f", str(f))
    assert r.returncode == 0 and "deleted [fd00:198:18:10::60]:0/udp" in r.stdout
    with server.client() as c:
        vips = c.call("ListVips", pb.ListVipsRequest()).vips
        mine = [v for v in vips if v.id.address in ("198.18.10.60", "fd00:198:18:10::60")]
        assert len(mine) == 1
        assert {b.address: b.weight for b in mine[0].backends} == {"198.18.2.1": 1, "198.18.2.3": 1}
        assert c.call("GetGateway", pb.GetGatewayRequest()).mac == "02:00:00:00:00:02"
        c.call("DeleteVip", pb.DeleteVipRequest(id=mine[0].id))


def test_apply_is_one_transaction_and_sets_the_global_keys(server, tmp_path):  # noqa: F811
    """A file whose last entry cannot be applied changes nothing at all; the
    global keys (mtu, udp_timeout, encapsulation sources, rates) reach the maps."""
    f = tmp_path / "lb.yaml"
    f.write_text("""
vips:
  - {address: 198.18.10.61, port: 80, protocol: tcp, backends: [{address: 198.18.2.1}]}
""")
    assert _cli(server, "apply", "-f", str(f)).returncode == 0
    with server.client() as c:
        before = sorted((v.id.address, v.id.port) for v in c.call("ListVips", pb.ListVipsRequest()).vips)
    many = "\n".join(f"  - {{address: 198.18.10.{100 + i}, port: 80, protocol: tcp, backends: [{{address: 198.18.2.{i + 1}}}]}}"
                     for i in range(8))  # more VIPs than the server's capacity (8) with the others
    f.write_text(f"mtu: 1400\nvips:\n  - {{address: 198.18.10.61, port: 80, protocol: tcp, backends: [{{address: 198.18.2.1}}]}}\n{many}\n")
    r = _cli(server, "apply", "-f", str(f))
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0, r.stderr
    with server.client() as c:
        after = sorted((v.id.address, v.id.port) for v in c.call("ListVips", pb.ListVipsRequest()).vips)
    assert after == before
    f.write_text("""
mtu: 1400
udp_timeout: 45
encap_source: {ipv4: 198.18.20.0/25}
vips:
  - {address: 198.18.10.61, port: 80, protocol: tcp, backends: [{address: 198.18.2.1}]}
""")
    r = _cli(server, "apply", "-f", str(f))
    assert r.returncode == 0, r.stderr
    assert "set " in r.stdout and "mtu" in r.stdout and "udp_timeout_s" in r.stdout and "encap_v4" in r.stdout
    state = json.loads((server.state / server.ifname / "state.json").read_text())
    assert (state["runtime"]["mtu"], state["runtime"]["udp_timeout_s"], state["runtime"]["encap_v4"]) == \
        (1400, 45, "198.18.20.0/25")
    fd = libbpf.obj_get(f"{consts.PIN_ROOT}/{server.ifname}/config")
    try:
        prog = bpf.load_balancer(consts.Capacity(max_vips=8, max_backends=64, ct_size=4096))
        leaf = prog.table(consts.MAP_CONFIG).Leaf
        raw = libbpf.map_lookup(fd, (0).to_bytes(4, "little"), ctypes.sizeof(leaf))
        assert leaf.from_buffer_copy(raw).mtu == 1400
        prog.close()
    finally:
        os.close(fd)
    assert _cli(server, "apply", "-f", str(f)).stdout.strip().endswith("0 change(s) applied")


def test_lookup_names_the_vip_and_picks_one_backend_per_client_on_affinity_vips(server):  # noqa: F811
    backends = {"198.18.2.1": 1, "198.18.2.2": 1, "198.18.2.3": 1}
    with server.client() as c:
        c.call("SetGateway", pb.SetGatewayRequest(mac="02:00:00:00:00:01"))
        vids = [_vip(c, "198.18.10.80", 0, proto, backends, ["client_affinity"]) for proto in ("tcp", "udp")]
        plain = _vip(c, "198.18.10.81", 80, "tcp", backends)
        picked = set()
        for client in range(1, 13):
            src = f"198.18.0.{client}"
            got = {c.call("LookupFlow", pb.LookupFlowRequest(src=src, dst="198.18.10.80", sport=1024 + p % 1000, dport=p,
                                                             protocol=proto)).backend
                   for p in (21, 5001, 5060, 40000) for proto in ("tcp", "udp")}
            assert len(got) == 1 and got <= set(backends), (src, got)
            picked |= got
        assert picked == set(backends)  # clients still spread
        r = _cli(server, "lookup", "198.18.0.5:4242", "198.18.10.80:5001", "udp")
        assert r.returncode == 0, r.stderr
        assert "VIP 198.18.10.80:0/udp" in r.stdout and "client address (client_affinity)" in r.stdout
        r = _cli(server, "lookup", "198.18.0.5:4242", "198.18.10.81:80", "tcp")
        assert "addresses, ports, protocol" in r.stdout
        r = _cli(server, "lookup", "198.18.0.5:4242", "198.18.10.82:80", "tcp")
        assert r.returncode == 0 and "PASS" in r.stdout and "VIP" not in r.stdout
        for v in (*vids, plain):
            c.call("DeleteVip", pb.DeleteVipRequest(id=v))
