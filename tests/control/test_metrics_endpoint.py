"""`l4lb run --metrics-listen`: the real process in a namespace the test
creates, scraped over HTTP on the namespace's loopback. The exposition
passes promtool, follows the configuration and the data plane's counters
(moved by real packets through the live program), counts gRPC calls by
method and code, times ring builds and pushes, keeps the data plane's
counters across a restart, and every bad argument is a one-line refusal
before anything is attached."""
from __future__ import annotations

import socket
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from control.l4lb.v1 import l4lb_pb2 as pb
from l4lb.testbed.namespaces import Node
from test_server import L4LB, Server

pytestmark = pytest.mark.kernel
VIP = pb.VipId(address="198.18.10.10", port=53, protocol="udp")
BACKENDS = {"198.18.2.1": 1, "198.18.2.2": 2, "fd00:198:18:2::3": 1}


def free_port(node: Node) -> int:
    """A free TCP port on the namespace's loopback."""
    def pick():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    return node.run(pick)


class Metrics:
    def __init__(self, node: Node, port: int):
        self.node, self.port = node, port
        self.url = f"http://127.0.0.1:{port}/metrics"

    def text(self) -> str:
        def get():
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
            with opener.open(self.url, timeout=10) as r:
                assert r.status == 200
                return r.read().decode()
        return self.node.run(get)

    def samples(self) -> dict[tuple, float]:
        """{(sample name, sorted labels): value}"""
        out = {}
        for fam in text_string_to_metric_families(self.text()):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out


def value(samples, name, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def series(samples, name) -> dict[tuple, float]:
    return {lab: v for (n, lab), v in samples.items() if n == name}


@pytest.fixture(scope="module")
def msrv(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("msrv"))
    subprocess.run(["ip", "-n", s.ns, "link", "set", "lo", "up"], check=True)
    node = Node("metrics", s.ns)
    try:
        port = free_port(node)
        s.extra = ["--metrics-listen", f"127.0.0.1:{port}"]
        s.start(*s.extra)
        s.metrics = Metrics(node, port)
        with s.client() as c:
            c.call("SetGateway", pb.SetGatewayRequest(mac="02:00:00:00:00:01"))
        yield s
    finally:
        node.close()
        s.cleanup()


def udp_lookups(c, n: int, base: int = 20000) -> None:
    """n new UDP flows through the live program (a UDP lookup is the flow's next packet)."""
    for sport in range(base, base + n):
        r = c.call("LookupFlow", pb.LookupFlowRequest(src="198.18.0.7", dst=VIP.address, sport=sport, dport=53,
                                                     protocol="udp"))
        assert r.verdict == "TX"


def test_the_exposition_passes_promtool(msrv):
    with msrv.client() as c:
        c.call("AddVip", pb.AddVipRequest(id=VIP, backends=[pb.Backend(address=a, weight=w) for a, w in BACKENDS.items()]))
        try:
            udp_lookups(c, 5)
            text = msrv.metrics.text()
        finally:
            c.call("DeleteVip", pb.DeleteVipRequest(id=VIP))
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "l4lb_backend_packets_total" in text and "l4lb_build_info" in text


def test_scraped_counters_equal_the_data_planes(msrv):
    with msrv.client() as c:
        c.call("AddVip", pb.AddVipRequest(id=VIP, backends=[pb.Backend(address=a, weight=w) for a, w in BACKENDS.items()]))
        try:
            udp_lookups(c, 60)
            for sport in range(20000, 20010):  # established flows: packets, no new flow
                c.call("LookupFlow", pb.LookupFlowRequest(src="198.18.0.7", dst=VIP.address, sport=sport, dport=53,
                                                         protocol="udp"))
            vip = c.call("GetVip", pb.GetVipRequest(id=VIP))
            stats = c.call("GetStats", pb.GetStatsRequest())
            m = msrv.metrics.samples()
        finally:
            c.call("DeleteVip", pb.DeleteVipRequest(id=VIP))
    label = "198.18.10.10:53/udp"
    assert (vip.packets, vip.new_flows) == (70, 60)
    assert value(m, "l4lb_vip_packets_total", vip=label) == vip.packets
    assert value(m, "l4lb_vip_bytes_total", vip=label) == vip.bytes
    assert value(m, "l4lb_vip_new_flows_total", vip=label) == vip.new_flows
    assert sum(b.packets for b in vip.backends) == vip.packets
    assert sum(b.new_flows for b in vip.backends) == vip.new_flows
    for b in vip.backends:
        assert value(m, "l4lb_backend_packets_total", backend=b.address) == b.packets
        assert value(m, "l4lb_backend_bytes_total", backend=b.address) == b.bytes
        assert value(m, "l4lb_backend_new_flows_total", backend=b.address) == b.new_flows
        assert value(m, "l4lb_backend_weight", vip=label, backend=b.address) == BACKENDS[b.address]
        assert value(m, "l4lb_backend_effective_weight", vip=label, backend=b.address) == b.effective_weight
        assert value(m, "l4lb_backend_up", vip=label, backend=b.address) == 1
    assert value(m, "l4lb_packets_total", verdict="tx", reason="forwarded") == stats.counters["tx"]
    assert value(m, "l4lb_conntrack_events_total", event="insert") == stats.counters["ct_insert"]
    assert value(m, "l4lb_conntrack_entries", family="ipv4") >= 60
    assert value(m, "l4lb_conntrack_capacity", family="ipv4") == 4096
    assert value(m, "l4lb_vips") == 1 and value(m, "l4lb_backends") == 3


def test_grpc_calls_are_counted_by_method_and_code(msrv):
    def count(m, method, code):
        return m.get(("l4lb_grpc_requests_total", tuple(sorted(
            {"service": "l4lb.v1.LoadBalancer", "method": method, "code": code}.items()))), 0)

    before = msrv.metrics.samples()
    with msrv.client() as c:
        c.call("GetStatus", pb.GetStatusRequest())
        c.call("GetStatus", pb.GetStatusRequest())
        with pytest.raises(Exception) as e:
            c.call("GetVip", pb.GetVipRequest(id=pb.VipId(address="198.18.10.99", port=1, protocol="tcp")))
        assert "NOT_FOUND" in str(e.value) or getattr(e.value, "code", lambda: None)().name == "NOT_FOUND"
    after = msrv.metrics.samples()
    assert count(after, "GetStatus", "OK") - count(before, "GetStatus", "OK") == 2
    assert count(after, "GetVip", "NOT_FOUND") - count(before, "GetVip", "NOT_FOUND") == 1
    lat = ("l4lb_grpc_request_duration_seconds_count",
           tuple(sorted({"service": "l4lb.v1.LoadBalancer", "method": "GetStatus"}.items())))
    assert after[lat] - before.get(lat, 0) == 2


def test_ring_builds_and_pushes_are_timed(msrv):
    before = msrv.metrics.samples()
    with msrv.client() as c:
        c.call("AddVip", pb.AddVipRequest(id=VIP, backends=[pb.Backend(address=a, weight=w) for a, w in BACKENDS.items()]))
        c.call("DeleteVip", pb.DeleteVipRequest(id=VIP))
    after = msrv.metrics.samples()
    for name in ("l4lb_ring_build_seconds_count", "l4lb_ring_push_seconds_count"):
        assert after[(name, ())] - before.get((name, ()), 0) >= 1, name
    assert after[("l4lb_ring_push_seconds_sum", ())] > before.get(("l4lb_ring_push_seconds_sum", ()), 0)


def test_data_plane_counters_survive_a_restart(msrv):
    with msrv.client() as c:
        c.call("AddVip", pb.AddVipRequest(id=VIP, backends=[pb.Backend(address=a, weight=w) for a, w in BACKENDS.items()]))
    try:
        with msrv.client() as c:
            udp_lookups(c, 30, base=30000)
        before = msrv.metrics.samples()
        msrv.stop()
        msrv.start(*msrv.extra)
        after = msrv.metrics.samples()
    finally:
        with msrv.client() as c:
            c.call("DeleteVip", pb.DeleteVipRequest(id=VIP))
    data_plane = ("l4lb_packets_total", "l4lb_conntrack_events_total", "l4lb_vip_packets_total",
                  "l4lb_vip_bytes_total", "l4lb_vip_new_flows_total", "l4lb_backend_packets_total",
                  "l4lb_backend_bytes_total", "l4lb_backend_new_flows_total")
    compared = 0
    for name in data_plane:
        for labels, v in series(before, name).items():
            if name.startswith(("l4lb_vip_", "l4lb_backend_")):
                assert after[(name, labels)] == v, (name, labels)  # no VIP traffic in between
            else:  # the kernel's own packets on the link (IPv6 solicitations) may pass meanwhile
                assert after[(name, labels)] >= v, (name, labels)
            compared += 1
    assert compared > 20
    assert value(after, "l4lb_backend_new_flows_total", backend="198.18.2.2") > 0


def _run(s: Server, *extra, timeout: float = 60) -> tuple[int, str]:
    r = subprocess.run(
        ["nsenter", f"--net=/run/netns/{s.ns}", L4LB, "run", "--interface", s.ifname, "--listen", f"unix:{s.sock}",
         "--state-dir", str(s.state), "--max-vips", "8", "--max-backends", "64", "--ct-size", "4096", *extra],
        capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr


@pytest.fixture
def other(tmp_path):
    s = Server(tmp_path)
    subprocess.run(["ip", "-n", s.ns, "link", "set", "lo", "up"], check=True)
    try:
        yield s
    finally:
        s.cleanup()


@pytest.mark.parametrize("args, why", [
    (["--metrics-listen", "198.18.1.2:9750"], "not a loopback address"),
    (["--metrics-listen", "0.0.0.0:9750"], "--metrics-allow-remote"),
    (["--metrics-listen", "localhost:9750"], "is not an IP address"),
    (["--metrics-listen", "127.0.0.1"], "use ADDRESS:PORT"),
    (["--metrics-listen", "127.0.0.1:99999"], "use ADDRESS:PORT"),
    (["--metrics-allow-remote"], "go with --metrics-listen"),
    (["--metrics-max-pairs", "10"], "go with --metrics-listen"),
])
def test_bad_metrics_arguments_are_one_line_refusals_before_loading(other, args, why):
    rc, out = _run(other, *args)
    assert rc == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("l4lb: error:") and why in lines[0], out
    assert other.xdp_id() == ""


def test_a_metrics_port_in_use_is_refused_before_loading(other):
    node = Node("busy", other.ns)
    try:
        holder = node.run(socket.socket)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        rc, out = _run(other, "--metrics-listen", f"127.0.0.1:{port}")
        holder.close()
    finally:
        node.close()
    assert rc == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and "cannot listen there" in lines[0] and str(port) in lines[0], out
    assert other.xdp_id() == ""


def _rows(frame: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("│").split("│")] for line in frame.splitlines()
            if line.count("│") >= 7]


def _num(cell: str) -> float:
    value, _, unit = cell.partition(" ")
    return float(value) * {"k": 1e3, "M": 1e6, "G": 1e9}.get(unit[:1], 1)


def test_stats_watch_shows_rates_per_vip_and_backend(msrv, tmp_path):
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415
    import time  # noqa: PLC0415

    out = tmp_path / "watch.out"
    with msrv.client() as c:
        c.call("AddVip", pb.AddVipRequest(id=VIP, backends=[pb.Backend(address=a, weight=w) for a, w in BACKENDS.items()]))
    stop = threading.Event()

    def load():
        with msrv.client() as c:
            sport = 50000
            while not stop.is_set():
                udp_lookups(c, 5, base=sport)
                sport = 50000 + (sport + 5 - 50000) % 10000
                time.sleep(0.01)

    loader = threading.Thread(target=load)
    watch = subprocess.Popen([L4LB, "stats", "--watch", "--interval", "0.5", "--server", f"unix:{msrv.sock}"],
                             stdout=open(out, "w"), stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
    try:
        loader.start()
        deadline = time.monotonic() + 30
        while out.read_text().count("rates over") < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=10) == 130
    finally:
        stop.set()
        loader.join()
        if watch.poll() is None:
            watch.kill()
        with msrv.client() as c:
            c.call("DeleteVip", pb.DeleteVipRequest(id=VIP))
    text = out.read_text()
    assert "Traceback" not in text and "first sample" in text
    frames = text.split("rates over")[2:-1]  # whole frames, after the first rate
    assert frames, text[-3000:]
    for frame in frames:
        rows = _rows(frame)
        vip_rows = [r for r in rows if r[0] == "198.18.10.10:53/udp"]
        backend_rows = [r for r in rows if r[0] == "" and r[1] in BACKENDS]
        assert len(vip_rows) == 1 and len(backend_rows) == 3, frame
        vip_pps = _num(vip_rows[0][2])
        assert vip_pps > 0, frame
        # the backends' rates add up to the VIP's (one VIP lists them all)
        total = sum(_num(r[2]) for r in backend_rows)
        assert abs(total - vip_pps) <= 0.02 * vip_pps + 0.3, frame
        assert vip_rows[0][3].endswith("B/s") and _num(vip_rows[0][3]) > 0
