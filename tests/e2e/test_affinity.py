"""iperf3 through a client_affinity VIP group: its TCP control connection and
its data streams (four TCP streams, or UDP) are separate flows that must all
reach the server that holds the control connection. With port-less TCP and
UDP VIPs flagged client_affinity on one address they do, over three backends."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from control.l4lb.v1 import l4lb_pb2 as pb
from e2e_util import canonical
from l4lb.testbed import TestbedError
from l4lb.testbed.namespaces import stop_popen

IPERF_PORT = 5201


def _listening(node, port: int) -> bool:
    r = subprocess.run(node.nsenter() + ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True)
    return bool(r.stdout.strip())


@pytest.fixture
def iperf_servers(bed):
    """iperf3 servers on every backend, bound to the VIP (so that UDP answers
    leave from the VIP: see docs/dsr-backend.md)."""
    vip = bed.vip4(3)
    procs = [subprocess.Popen(b.nsenter() + ["iperf3", "-s", "-B", vip, "-p", str(IPERF_PORT)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for b in bed.backends]
    try:
        deadline = time.monotonic() + 10
        while not all(_listening(b, IPERF_PORT) for b in bed.backends):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise TestbedError("iperf3 servers did not start: " +
                                   "; ".join((p.stderr.read() or b"").decode()[:200] for p in procs if p.poll() is not None))
            time.sleep(0.1)
        yield vip
    finally:
        for p in procs:
            stop_popen(p)


def _iperf(client, vip: str, *args: str) -> dict:
    r = subprocess.run(client.nsenter() + ["iperf3", "-c", vip, "-p", str(IPERF_PORT), "-t", "2", "--json",
                                           "--connect-timeout", "3000", *args],
                       capture_output=True, text=True, timeout=40)
    doc = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
    assert r.returncode == 0 and "error" not in doc, (args, doc.get("error"), r.stderr[-300:])
    return doc


def _flow_backends(lb, vid) -> dict[tuple[str, int], str]:
    return {(canonical(f.src), f.sport): canonical(f.backend)
            for f in lb.call("ListFlows", pb.ListFlowsRequest(id=vid)).flows}


def test_iperf3_parallel_tcp_and_udp_work_through_a_client_affinity_group(bed, lb, iperf_servers):
    vip = iperf_servers
    backends = {b.addr4: 1 for b in bed.backends}
    assert len(backends) == 3
    client = bed.clients[0]
    with lb.vip(vip, backends, port=0, protocol="tcp", flags=["client_affinity"]) as tcp, \
            lb.vip(vip, backends, port=0, protocol="udp", flags=["client_affinity"]) as udp:
        doc = _iperf(client, vip, "-P", "4")
        assert len(doc["start"]["connected"]) == 4
        assert doc["end"]["sum_received"]["bytes"] > 0
        doc = _iperf(client, vip, "-u", "-b", "20M")
        assert doc["end"]["sum"]["packets"] > 0 and doc["end"]["sum"]["lost_percent"] < 5
        flows = {**_flow_backends(lb, tcp), **_flow_backends(lb, udp)}
        # the control connections, the four TCP streams and the UDP stream: one client, one backend
        assert len(flows) >= 7 and {src for src, _ in flows} == {client.addr4}
        assert len(set(flows.values())) == 1, flows
        chosen = set(flows.values()).pop()
        assert chosen == lb.lookup(client.addr4, vip, 40000, 9, "udp")  # any port: the same backend


def test_a_tcp_burst_through_the_lb_loses_no_frame_on_the_lb_link(bed, lb, iperf_servers):
    """Eight iperf3 streams at full speed: the router's end of the LB link
    queues instead of dropping what the LB's ring cannot take at once
    (without a qdisc: thousands of drops and retransmits per run), and its
    queue is deep enough for the LB's NAPI thread to be scheduled out a
    while on a shared CPU (with 1,000 packets: thousands of drops)."""
    vip = iperf_servers
    backends = {b.addr4: 1 for b in bed.backends}
    before = bed.router.run(bed.router.link_stats, "lb")
    queued = bed.router.qdisc_stats("lb")
    with lb.vip(vip, backends, port=0, protocol="tcp", flags=["client_affinity"]), \
            lb.vip(vip, backends, port=0, protocol="udp", flags=["client_affinity"]):
        doc = _iperf(bed.clients[0], vip, "-P", "8", "-t", "4")
    after = bed.router.run(bed.router.link_stats, "lb")
    assert doc["end"]["sum_received"]["bytes"] > 0
    assert after["tx_packets"] - before["tx_packets"] > 10_000  # the burst went this way
    assert after["tx_dropped"] - before["tx_dropped"] == 0
    assert bed.router.qdisc_stats("lb")["drops"] - queued["drops"] == 0
