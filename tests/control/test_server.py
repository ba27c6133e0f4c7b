"""The real `l4lb run` process, attached to a veth in a namespace the test
creates, driven by real gRPC clients."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from control.client import Client
from control.l4lb.v1 import l4lb_pb2 as pb
from l4lb import bpf
from l4lb.flowhash import flow_hash, ring_slot
from l4lb.maglev import maglev_table

pytestmark = pytest.mark.kernel
L4LB = str(Path(sys.executable).with_name("l4lb"))
VIP = pb.VipId(address="198.18.10.10", port=80, protocol="tcp")


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Server:
    def __init__(self, tmp: Path):
        self.ns = f"l4lbt-{uuid.uuid4().hex[:8]}"
        self.ifname = f"lb{uuid.uuid4().hex[:8]}"
        self.sock = tmp / "l4lb.sock"
        self.state = tmp / "state"
        self.log = tmp / "server.log"
        self.proc = None
        _ip("netns", "add", self.ns)
        _ip("-n", self.ns, "link", "add", self.ifname, "numtxqueues", "2", "numrxqueues", "2", "type", "veth",
            "peer", "name", "peer0", "numtxqueues", "2", "numrxqueues", "2")
        _ip("-n", self.ns, "link", "set", self.ifname, "up")
        _ip("-n", self.ns, "link", "set", "peer0", "up")

    def start(self, *extra):
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.ns}", L4LB, "run", "--interface", self.ifname,
             "--listen", f"unix:{self.sock}", "--state-dir", str(self.state), "--max-vips", "8",
             "--max-backends", "64", "--ct-size", "4096", *extra],
            stdout=open(self.log, "a"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.log.read_text()}")
            if self.sock.exists():
                try:
                    with grpc.insecure_channel(f"unix:{self.sock}") as ch:
                        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                        if r.status == health_pb2.HealthCheckResponse.SERVING:
                            return
                except grpc.RpcError:
                    pass
            time.sleep(0.2)
        raise AssertionError("server did not become healthy")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)

    def client(self) -> Client:
        return Client(f"unix:{self.sock}")

    def xdp_id(self) -> str:
        out = subprocess.run(["ip", "-n", self.ns, "-d", "link", "show", self.ifname], capture_output=True, text=True).stdout
        return out.split("prog/xdp id ")[1].split()[0] if "prog/xdp id " in out else ""

    def cleanup(self):
        self.stop()
        subprocess.run(["ip", "-n", self.ns, "link", "set", self.ifname, "xdp", "off"], capture_output=True)
        bpf.remove_pins(f"/sys/fs/bpf/l4lb/{self.ifname}")
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("srv"))
    try:
        s.start()
        yield s
    finally:
        s.cleanup()


def test_health_service_reports_serving(server):
    with grpc.insecure_channel(f"unix:{server.sock}") as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="l4lb.v1.LoadBalancer"))
    assert r.status == health_pb2.HealthCheckResponse.SERVING
    assert oct(os.stat(server.sock).st_mode & 0o777) == "0o660"


def test_live_program_picks_the_backend_that_maglev_predicts(server):
    backends = {"198.18.2.1": 1, "198.18.2.2": 2, "fd00:198:18:2::3": 1}
    with server.client() as c:
        c.call("SetGateway", pb.SetGatewayRequest(mac="02:00:00:00:00:01"))
        c.call("AddVip", pb.AddVipRequest(id=VIP, backends=[pb.Backend(address=a, weight=w) for a, w in backends.items()]))
        table = maglev_table(backends, 65537)
        for sport in range(20000, 20200):
            r = c.call("LookupFlow", pb.LookupFlowRequest(src="198.18.0.7", dst=VIP.address, sport=sport, dport=80, protocol="tcp"))
            want = table[ring_slot(flow_hash("198.18.0.7", VIP.address, sport, 80, 6), 65537)]
            assert (r.verdict, r.backend) == ("TX", want)
        c.call("SetBackendWeights", pb.SetBackendWeightsRequest(id=VIP, backends=[pb.Backend(address="198.18.2.2", weight=0)]))
        got = {c.call("LookupFlow", pb.LookupFlowRequest(src="198.18.0.7", dst=VIP.address, sport=s, dport=80, protocol="tcp")).backend
               for s in range(30000, 30100)}
        assert "198.18.2.2" not in got and got <= set(backends)
        c.call("DeleteVip", pb.DeleteVipRequest(id=VIP))


BAD = [
    ("AddVip", pb.AddVipRequest(id=pb.VipId(address="198.18.10.300", port=80, protocol="tcp")), grpc.StatusCode.INVALID_ARGUMENT),
    ("AddVip", pb.AddVipRequest(id=pb.VipId(address="198.18.10.11", port=70000, protocol="tcp")), grpc.StatusCode.INVALID_ARGUMENT),
    ("AddVip", pb.AddVipRequest(id=pb.VipId(address="198.18.10.11", port=80, protocol="sctp")), grpc.StatusCode.INVALID_ARGUMENT),
    ("AddVip", pb.AddVipRequest(id=pb.VipId(address="198.18.10.11", port=80, protocol="tcp"), flags=["turbo"]), grpc.StatusCode.INVALID_ARGUMENT),
    ("AddVip", pb.AddVipRequest(id=pb.VipId(address="fd00:198:18:10::1", port=80, protocol="tcp"),
                                backends=[pb.Backend(address="198.18.2.1", weight=1)]), grpc.StatusCode.INVALID_ARGUMENT),
    ("AddVip", pb.AddVipRequest(id=pb.VipId(address="198.18.10.11", port=80, protocol="tcp"),
                                backends=[pb.Backend(address="198.18.2.1", weight=70000)]), grpc.StatusCode.INVALID_ARGUMENT),
    ("AddVip", pb.AddVipRequest(), grpc.StatusCode.INVALID_ARGUMENT),
    ("AddVip", pb.AddVipRequest(id=VIP), grpc.StatusCode.ALREADY_EXISTS),
    ("DeleteVip", pb.DeleteVipRequest(id=pb.VipId(address="198.18.10.99", port=80, protocol="tcp")), grpc.StatusCode.NOT_FOUND),
    ("GetVip", pb.GetVipRequest(id=pb.VipId(address="198.18.10.99", port=80, protocol="tcp")), grpc.StatusCode.NOT_FOUND),
    ("AddBackends", pb.AddBackendsRequest(id=VIP, backends=[pb.Backend(address="198.18.2.1", weight=1)]), grpc.StatusCode.ALREADY_EXISTS),
    ("AddBackends", pb.AddBackendsRequest(id=VIP, backends=[pb.Backend(address="198.18.2.5", weight=1),
                                                            pb.Backend(address="bogus", weight=1)]), grpc.StatusCode.INVALID_ARGUMENT),
    ("AddBackends", pb.AddBackendsRequest(id=VIP, backends=[pb.Backend(address=f"198.18.3.{i}", weight=1) for i in range(1, 70)]),
     grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("RemoveBackends", pb.RemoveBackendsRequest(id=VIP, addresses=["198.18.2.1", "198.18.2.9"]), grpc.StatusCode.NOT_FOUND),
    ("SetBackendWeights", pb.SetBackendWeightsRequest(id=VIP, backends=[pb.Backend(address="198.18.2.9", weight=1)]), grpc.StatusCode.NOT_FOUND),
    ("ModifyVip", pb.ModifyVipRequest(id=VIP, flags=["no_source_port", "nope"]), grpc.StatusCode.INVALID_ARGUMENT),
    ("SetGateway", pb.SetGatewayRequest(mac="zz:00:00:00:00:01"), grpc.StatusCode.INVALID_ARGUMENT),
    ("SetGateway", pb.SetGatewayRequest(ip="198.18.1.254"), grpc.StatusCode.INVALID_ARGUMENT),
    ("WatchStats", None, None),
]


@pytest.mark.parametrize("rpc, request_, code", [b for b in BAD if b[1] is not None],
                         ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD) if b[1] is not None])
def test_bad_request_gets_its_status_and_changes_nothing(server, rpc, request_, code):
    with server.client() as c:
        try:
            c.call("AddVip", pb.AddVipRequest(id=VIP, backends=[pb.Backend(address="198.18.2.1", weight=1)]))
        except grpc.RpcError:
            pass
        before = (c.call("ListVips", pb.ListVipsRequest()), c.call("GetGateway", pb.GetGatewayRequest()))
        with pytest.raises(grpc.RpcError) as e:
            c.call(rpc, request_)
        assert e.value.code() == code, e.value.details()
        assert e.value.details()  # a message a person can act on
        after = (c.call("ListVips", pb.ListVipsRequest()), c.call("GetGateway", pb.GetGatewayRequest()))
        assert after == before


def test_restart_adopts_state_and_keeps_the_same_program(server):
    with server.client() as c:
        c.call("SetGateway", pb.SetGatewayRequest(mac="02:00:00:00:00:01"))
        vid = pb.VipId(address="198.18.10.20", port=0, protocol="udp")
        c.call("AddVip", pb.AddVipRequest(id=vid, flags=["no_source_port"], backends=[
            pb.Backend(address="198.18.2.1", weight=3), pb.Backend(address="fd00:198:18:2::1", weight=0)]))
        before = c.call("GetVip", pb.GetVipRequest(id=vid))
        picks = [c.call("LookupFlow", pb.LookupFlowRequest(src="198.18.0.9", dst=vid.address, sport=1000 + i,
                                                           dport=53, protocol="udp")).backend for i in range(20)]
        prog_id = server.xdp_id()
    server.stop()
    assert server.xdp_id() == prog_id  # still attached while the control plane is down
    server.start()
    with server.client() as c:
        after = c.call("GetVip", pb.GetVipRequest(id=vid))
        def config(v):
            return [(b.address, b.weight, b.effective_weight) for b in v.backends], list(v.flags), v.vip_id
        assert config(after) == config(before)
        assert after.packets >= before.packets + 20
        # the per-backend counters came through the restart too, with the lookups' packets
        assert sum(b.packets for b in after.backends) >= sum(b.packets for b in before.backends) + 20
        assert c.call("GetGateway", pb.GetGatewayRequest()).mac == "02:00:00:00:00:01"
        status = c.call("GetStatus", pb.GetStatusRequest())
        assert str(status.program_id) == prog_id == server.xdp_id()
        assert status.capacity.max_vips == 8 and status.capacity.max_backends == 64
        # the maps' real kernel memory: at least the 2 x 8 rings of 65537 slots
        assert status.capacity.kernel_bytes >= 16 * 65537 * 4
        again = [c.call("LookupFlow", pb.LookupFlowRequest(src="198.18.0.9", dst=vid.address, sport=1000 + i,
                                                           dport=53, protocol="udp")).backend for i in range(20)]
        assert again == picks


def _run_once(s: Server, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["nsenter", f"--net=/run/netns/{s.ns}", L4LB, "run", "--interface", s.ifname,
         "--listen", f"unix:{s.sock}", "--state-dir", str(s.state), "--max-vips", "8",
         "--max-backends", "64", "--ct-size", "4096", *extra], capture_output=True, text=True, timeout=120)


def test_a_foreign_xdp_program_is_replaced_only_with_force(tmp_path):
    s = Server(tmp_path)
    try:
        subprocess.run(["nsenter", f"--net=/run/netns/{s.ns}", sys.executable, "-c",
                        f"from l4lb import bpf; p = bpf.load_decap(); p.attach({s.ifname!r}, 'native')"],
                       check=True, capture_output=True, timeout=120)
        foreign = s.xdp_id()
        r = _run_once(s)
        assert r.returncode == 2 and "not l4lb's" in r.stderr and "--force" in r.stderr
        assert s.xdp_id() == foreign
        s.start("--force")
        assert s.xdp_id() not in ("", foreign)
    finally:
        s.cleanup()


def test_pinned_maps_of_another_layout_are_refused(tmp_path):
    import json

    s = Server(tmp_path)
    try:
        s.start()
        s.stop()
        state_file = s.state / s.ifname / "state.json"
        doc = json.loads(state_file.read_text())
        # as if the new build had a smaller connection table but claimed the same state
        doc["capacity"]["ct_size"] = 2048
        doc["source_hash"] = "older build"
        state_file.write_text(json.dumps(doc))
        r = subprocess.run(
            ["nsenter", f"--net=/run/netns/{s.ns}", L4LB, "run", "--interface", s.ifname,
             "--listen", f"unix:{s.sock}", "--state-dir", str(s.state), "--max-vips", "8",
             "--max-backends", "64", "--ct-size", "2048"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2
        assert "another layout" in r.stderr and "conntrack" in r.stderr
        r = _run_once(s)  # sizes differing from the saved state are refused before any compile
        assert r.returncode == 2 and "pinned maps were made with" in r.stderr
    finally:
        s.cleanup()


def test_gateway_is_resolved_from_the_neighbour_table(server):
    _ip("-n", server.ns, "neigh", "replace", "198.18.1.254", "lladdr", "02:00:00:00:00:fe", "dev", server.ifname,
        "nud", "permanent")
    with server.client() as c:
        g = c.call("SetGateway", pb.SetGatewayRequest(ip="198.18.1.254"))
        assert (g.mac, g.ip) == ("02:00:00:00:00:fe", "198.18.1.254")
        assert c.call("GetGateway", pb.GetGatewayRequest()).mac == "02:00:00:00:00:fe"
        c.call("SetGateway", pb.SetGatewayRequest(mac="02:00:00:00:00:01"))


def test_run_applies_its_config_file(tmp_path):
    cfg = tmp_path / "lb.yaml"
    cfg.write_text("""
gateway_mac: "02:00:00:00:00:07"
vips:
  - {address: 198.18.10.70, port: 8080, protocol: tcp, backends: [{address: 198.18.2.7, weight: 2}]}
""")
    s = Server(tmp_path)
    try:
        s.start("--config", str(cfg))
        with s.client() as c:
            v = c.call("GetVip", pb.GetVipRequest(id=pb.VipId(address="198.18.10.70", port=8080, protocol="tcp")))
            assert [(b.address, b.weight) for b in v.backends] == [("198.18.2.7", 2)]
            assert c.call("GetGateway", pb.GetGatewayRequest()).mac == "02:00:00:00:00:07"
            r = c.call("LookupFlow", pb.LookupFlowRequest(src="198.18.0.1", dst="198.18.10.70", sport=1, dport=8080, protocol="tcp"))
            assert (r.verdict, r.backend) == ("TX", "198.18.2.7")
        bad = tmp_path / "bad.yaml"
        bad.write_text("vips: [{address: 198.18.10.70, protocol: tcp, port: -1}]")
        s.stop()
        r = subprocess.run(["nsenter", f"--net=/run/netns/{s.ns}", L4LB, "run", "--interface", s.ifname,
                            "--listen", f"unix:{s.sock}", "--state-dir", str(s.state), "--config", str(bad)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "vips[0].port" in r.stderr
    finally:
        s.cleanup()
