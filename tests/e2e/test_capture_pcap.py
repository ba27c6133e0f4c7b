"""`l4lb capture` during real traffic through the namespace testbed: the
file it writes is pcapng that tcpdump lists; every forwarded packet is there
as received and as sent, the sent copy's outer header going to the backend
that answered the connection and its inner packet the received one, byte for
byte; --vip, --backend and --verdict select exactly; --count stops it and
capture is then off again (no copy is made any more); bad arguments are one
line."""
from __future__ import annotations

import ipaddress
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from scapy.layers.inet import IP, TCP
from scapy.utils import rdpcap

from control.launcher import launcher
from e2e_util import Lb, settle
from l4lb.testbed import Testbed
from test_metrics_prometheus import free_loopback_port

L4LB = str(Path(sys.executable).with_name("l4lb"))


@pytest.fixture(scope="module")
def cbed():
    port = free_loopback_port()
    args = ["--max-vips", "32", "--max-backends", "64", "--ct-size", "65536", "--metrics-listen", f"127.0.0.1:{port}"]
    with Testbed(decap="xdp", launcher=launcher(), lb_args=args) as tb:
        tb.metrics_url = f"http://127.0.0.1:{port}/metrics"
        yield tb


@pytest.fixture(scope="module")
def api(cbed):
    a = Lb(cbed)
    try:
        yield a
    finally:
        a.close()


def scrape(bed) -> dict:
    def get():
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(bed.metrics_url, timeout=10) as r:
            return r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(bed.lb.run(get)):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def copies_made(bed) -> tuple[float, float]:
    m = scrape(bed)
    return (m[("l4lb_capture_copies_total", (("outcome", "copied"),))],
            m[("l4lb_capture_copies_total", (("outcome", "lost"),))])


class Capture:
    """`l4lb capture ... -w FILE` in the background, started once capture is on."""

    def __init__(self, bed, path: Path, *args):
        self.bed, self.path = bed, path
        self.proc = subprocess.Popen([L4LB, "capture", "--server", bed.lb.grpc_address, "-w", str(path), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        while scrape(bed)[("l4lb_capture_active", ())] != 1:
            assert self.proc.poll() is None, self.proc.communicate()
            assert time.monotonic() < deadline, "capture never started"
            time.sleep(0.05)

    def wait(self, timeout: float = 30) -> str:
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err
        return err


def connections(bed, address: str, n: int) -> list:
    conns = []
    for i in range(n):
        c = bed.clients[i % len(bed.clients)].connect(address)
        c.ask("hello")
        conns.append(c)
    for c in conns:
        c.close()
    return conns


def packets(path: Path) -> list[tuple[dict, bytes]]:
    out = []
    for p in rdpcap(str(path)):
        note = (p.comment or b"").decode()
        words = note.split()
        assert words[0] == "l4lb" and words[1] in ("received", "sent"), note
        meta = dict(w.split("=", 1) for w in words[2:])
        meta["sent"] = words[1] == "sent"
        meta["time"] = float(p.time)
        out.append((meta, bytes(p)))
    return out


@pytest.fixture(scope="module")
def vips(cbed, api):
    b = {x.role: x.addr4 for x in cbed.backends}
    with api.vip(cbed.vip4(5), {b["b1"]: 1, b["b2"]: 1, b["b3"]: 1}) as a, \
            api.vip(cbed.vip4(6), {b["b1"]: 1, b["b2"]: 1}) as other, \
            api.vip(cbed.vip4(7), {}) as empty:
        yield a, other, empty


def label(vid) -> str:
    return f"{vid.address}:{vid.port}/{vid.protocol}"


def test_a_vip_capture_holds_each_packet_as_received_and_as_sent(cbed, vips, tmp_path):
    a, other, _ = vips
    path = tmp_path / "a.pcapng"
    t0 = time.time()
    cap = Capture(cbed, path, "--vip", label(a), "--count", "40")
    conns = connections(cbed, a.address, 10) + connections(cbed, other.address, 5)
    summary = cap.wait()
    t1 = time.time()
    assert "40 packets (80 copies)" in summary, summary
    listed = subprocess.run(["tcpdump", "-nn", "-r", str(path)], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.splitlines()) == 80
    got = packets(path)
    assert len(got) == 80
    assert {m["vip"] for m, _ in got} == {label(a)}  # nothing of the other VIP
    by_port = {c.sport: next(b.addr4 for b in cbed.backends if b.role == c.backend) for c in conns}
    encap_net = ipaddress.ip_network("198.18.20.0/24")
    for (rm, received), (sm, sent) in zip(got[0::2], got[1::2]):
        assert (rm["sent"], sm["sent"]) == (False, True)
        assert (rm["cpu"], int(rm["seq"]) + 1) == (sm["cpu"], int(sm["seq"]))
        assert rm["verdict"] == sm["verdict"] == "tx" and rm["backend"] == sm["backend"]
        outer = IP(sent[14:])
        assert outer.proto == 4 and outer.dst == sm["backend"]
        assert ipaddress.ip_address(outer.src) in encap_net
        assert sent[34:] == received[14:]  # the inner packet is the received one, byte for byte
        inner = IP(received[14:])
        assert inner.dst == a.address and inner[TCP].dport == 80
        # the backend the copy names is the one that answered this connection
        assert by_port[inner[TCP].sport] == sm["backend"]
    # timestamps: wall-clock time of this capture, in order on each CPU
    for cpu in {m["cpu"] for m, _ in got}:
        stamps = [m["time"] for m, _ in got if m["cpu"] == cpu]
        assert stamps == sorted(stamps)
        assert t0 - 1 <= stamps[0] and stamps[-1] <= t1 + 1


def test_backend_and_verdict_filters_select_exactly(cbed, vips, tmp_path):
    a, other, empty = vips
    b2 = next(b.addr4 for b in cbed.backends if b.role == "b2")
    path = tmp_path / "b2.pcapng"
    cap = Capture(cbed, path, "--backend", b2, "--count", "10")
    conns = []
    while cap.proc.poll() is None and len(conns) < 200:
        conns += connections(cbed, a.address, 5) + connections(cbed, other.address, 5)
    cap.wait()
    got = packets(path)
    assert len(got) == 20 and {m["backend"] for m, _ in got} == {b2}
    assert {m["vip"] for m, _ in got} <= {label(a), label(other)}
    assert all(IP(p[14:]).dst == b2 for m, p in got if m["sent"])

    path = tmp_path / "drops.pcapng"
    cap = Capture(cbed, path, "--verdict", "drop", "--duration", "3")
    connections(cbed, a.address, 5)
    for client in cbed.clients:  # SYNs to a VIP without backends are dropped
        with pytest.raises(Exception):
            client.connect(empty.address, timeout=0.5)
    cap.wait()
    got = packets(path)
    assert got and {(m["verdict"], m["vip"], m["sent"]) for m, _ in got} == {("drop", label(empty), False)}
    assert all(IP(p[14:]).dst == empty.address for _, p in got)


def test_a_capture_stopped_by_count_leaves_capture_off(cbed, vips, tmp_path):
    a, _, _ = vips
    cap = Capture(cbed, tmp_path / "c.pcapng", "--vip", label(a), "--count", "3")
    connections(cbed, a.address, 3)
    cap.wait()
    assert scrape(cbed)[("l4lb_capture_active", ())] == 0
    before = settle(lambda: copies_made(cbed))
    connections(cbed, a.address, 10)
    assert copies_made(cbed) == before


@pytest.mark.parametrize("args, status, why", [
    (["--vip", "198.18.10.99:80/tcp"], 1, "NOT_FOUND"),
    (["--vip", "198.18.10.15:80/tcp", "--backend", "198.18.2.3"], 1, "is not on VIP"),
    (["--backend", "198.18.2.77"], 1, "is on no VIP"),
    (["--snaplen", "99999"], 2, "--snaplen"),
    (["--verdict", "sent"], 2, "invalid choice"),
    (["--duration", "0"], 2, "--duration"),
])
def test_bad_capture_arguments_are_one_line(cbed, vips, tmp_path, args, status, why):
    a, other, _ = vips
    args = [x.replace("198.18.10.15", other.address) for x in args]
    r = subprocess.run([L4LB, "capture", "--server", cbed.lb.grpc_address, "-w", str(tmp_path / "x.pcapng"), *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == status, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and why in lines[0], r.stderr
    assert scrape(cbed)[("l4lb_capture_active", ())] == 0
