"""Metrics under real traffic: TCP connections through the namespace testbed,
`l4lb run --metrics-listen` on the LB namespace's loopback, and a real
Prometheus server (Debian's package) that the test starts beside it on that
loopback, with its own configuration and data directory. The scraped
counters equal the data plane's (GetVip) and the backends' own counts
(connections answered, packets decapsulated); a PromQL query through
Prometheus' HTTP API gives the per-backend rates; a restart of `l4lb run`
is no counter reset for Prometheus."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from control.l4lb.v1 import l4lb_pb2 as pb
from control.launcher import launcher
from e2e_util import Lb, settle
from l4lb.testbed import Testbed
from l4lb.testbed.namespaces import stop_popen

WEIGHTS = {"b1": 1, "b2": 1, "b3": 2}
SCRAPE_INTERVAL = 1  # seconds


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(node, url: str) -> bytes:
    def get():
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
        with opener.open(url, timeout=10) as r:
            return r.read()
    return node.run(get)


class Prometheus:
    """prometheus, started in the LB's namespace on its loopback, scraping l4lb."""

    def __init__(self, node, target: str, workdir: Path):
        if not shutil.which("prometheus"):
            pytest.fail("prometheus is not installed: run `make setup` (Debian package prometheus)")
        self.node = node
        self.port = free_loopback_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cfg = workdir / "prometheus.yml"
        cfg.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL}s", "scrape_timeout": f"{SCRAPE_INTERVAL}s"},
            "scrape_configs": [{"job_name": "l4lb", "static_configs": [{"targets": [target]}]}]}))
        self.log = workdir / "prometheus.log"
        self.proc = subprocess.Popen(
            node.nsenter() + ["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'data'}",
                              f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.log.read_text()[-2000:]}")
            try:
                if http_get(node, f"{self.base}/-/ready"):
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("prometheus did not become ready")

    def query(self, promql: str) -> list[dict]:
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        doc = json.loads(http_get(self.node, url))
        assert doc["status"] == "success", doc
        return doc["data"]["result"]

    def wait_for(self, promql: str, ok, timeout: float = 30.0) -> list[dict]:
        """Queries until ok(result) (ingestion trails the scrapes by a little)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if ok(result) or time.monotonic() > deadline:
                return result
            time.sleep(0.5)

    def close(self) -> None:
        stop_popen(self.proc)


@pytest.fixture(scope="module")
def mbed():
    port = free_loopback_port()
    args = ["--max-vips", "32", "--max-backends", "64", "--ct-size", "65536",
            "--metrics-listen", f"127.0.0.1:{port}"]
    with Testbed(decap="xdp", launcher=launcher(), lb_args=args) as tb:
        tb.metrics_url = f"http://127.0.0.1:{port}/metrics"
        yield tb


@pytest.fixture(scope="module")
def api(mbed):
    a = Lb(mbed)
    try:
        yield a
    finally:
        a.close()


@pytest.fixture(scope="module")
def prom(mbed):
    workdir = Path(tempfile.mkdtemp(prefix="l4lb-prometheus-"))
    p = Prometheus(mbed.lb, mbed.metrics_url.split("/")[2], workdir)
    try:
        yield p
    finally:
        p.close()
        shutil.rmtree(workdir, ignore_errors=True)


def scrape(bed) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(http_get(bed.lb, bed.metrics_url).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def traffic(bed, address: str, seconds: float) -> Counter:
    """Connections one after another for `seconds`; the backends that answered."""
    answered = Counter()
    deadline, i = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        c = bed.clients[i % len(bed.clients)].connect(address)
        answered[c.ask("hello")] += 1
        c.close()
        i += 1
    return answered


@pytest.fixture(scope="module")
def burst(mbed, api, prom):
    """Traffic to one IPv4 VIP for a few seconds while Prometheus scrapes,
    with every count read before and after."""
    weights = {b.addr4: WEIGHTS[b.role] for b in mbed.backends}
    with api.vip(mbed.vip4(3), weights) as vid:
        decap0 = {b.role: b.decap_counts()["decap4"] for b in mbed.backends}
        m0 = scrape(mbed)
        answered = traffic(mbed, vid.address, 6 * SCRAPE_INTERVAL)
        decap1 = settle(lambda: {b.role: b.decap_counts()["decap4"] for b in mbed.backends})
        m1 = settle(lambda: scrape_counters(mbed))
        vip = api.call("GetVip", pb.GetVipRequest(id=vid))
        yield {"vid": vid, "answered": answered, "decap": {r: decap1[r] - decap0[r] for r in decap1},
               "m0": m0, "m1": scrape(mbed), "vip": vip, "settled": m1}


def scrape_counters(bed) -> dict:
    return {k: v for k, v in scrape(bed).items() if k[0].endswith("_total") and "grpc" not in k[0]}


def test_scraped_counters_equal_the_data_plane_and_the_backends_counts(mbed, burst):
    m0, m1, vip = burst["m0"], burst["m1"], burst["vip"]
    by_name = {b.addr4: b.role for b in mbed.backends}
    assert sum(burst["answered"].values()) >= 20, "too little traffic to compare"
    for b in vip.backends:
        role = by_name[b.address]
        # the metrics say what GetVip says (the data plane's counters, summed over CPUs)
        assert metric(m1, "l4lb_backend_packets_total", backend=b.address) == b.packets
        assert metric(m1, "l4lb_backend_new_flows_total", backend=b.address) == b.new_flows
        assert metric(m1, "l4lb_backend_bytes_total", backend=b.address) == b.bytes
        # ... and what the backends saw: a new flow per connection answered, a packet per decapsulation
        new_flows = metric(m1, "l4lb_backend_new_flows_total", backend=b.address) - \
            metric(m0, "l4lb_backend_new_flows_total", backend=b.address)
        packets = metric(m1, "l4lb_backend_packets_total", backend=b.address) - \
            metric(m0, "l4lb_backend_packets_total", backend=b.address)
        assert new_flows == burst["answered"][role], role
        assert packets == burst["decap"][role], role
    label = f"{vip.id.address}:{vip.id.port}/{vip.id.protocol}"
    assert metric(m1, "l4lb_vip_packets_total", vip=label) == vip.packets == sum(b.packets for b in vip.backends)
    assert metric(m1, "l4lb_vip_new_flows_total", vip=label) == vip.new_flows == sum(burst["answered"].values())


def test_prometheus_answers_per_backend_rates(mbed, burst, prom):
    want = {b.addr4 for b in mbed.backends if burst["answered"][b.role]}
    assert len(want) >= 2
    assert prom.query('up{job="l4lb"}')[0]["value"][1] == "1"
    q = "sum by (backend) (rate(l4lb_backend_new_flows_total[30s]))"
    result = prom.wait_for(q, lambda r: {x["metric"]["backend"] for x in r if float(x["value"][1]) > 0} >= want)
    rates = {x["metric"]["backend"]: float(x["value"][1]) for x in result}
    assert {a for a, r in rates.items() if r > 0} == want, rates
    # packets per second too, and the rates' total is the VIP's
    q = "sum by (backend) (rate(l4lb_backend_packets_total[30s]))"
    result = prom.wait_for(q, lambda r: {x["metric"]["backend"] for x in r if float(x["value"][1]) > 0} >= want)
    assert {x["metric"]["backend"] for x in result if float(x["value"][1]) > 0} == want


def test_a_restart_of_l4lb_run_is_no_counter_reset_for_prometheus(mbed, api, burst, prom):
    before = burst["settled"]
    mbed.lb.restart()
    api.reconnect()
    after = scrape_counters(mbed)
    for key, v in before.items():
        if key[0].startswith(("l4lb_vip_", "l4lb_backend_")):
            assert after.get(key) == v, key  # the VIP still exists; nothing was sent meanwhile
        else:
            assert after.get(key, 0) >= v, key
    # Prometheus, scraping through the restart, sees no reset of any data-plane counter
    time.sleep(3 * SCRAPE_INTERVAL)
    for name in ("l4lb_packets_total", "l4lb_conntrack_events_total", "l4lb_vip_packets_total",
                 "l4lb_vip_bytes_total", "l4lb_vip_new_flows_total", "l4lb_backend_packets_total",
                 "l4lb_backend_bytes_total", "l4lb_backend_new_flows_total"):
        result = prom.wait_for(f"sum(resets({name}[5m]))", lambda r: bool(r))
        assert result and float(result[0]["value"][1]) == 0, (name, result)
    assert prom.query('up{job="l4lb"}')[0]["value"][1] == "1"
