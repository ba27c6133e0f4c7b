"""`l4lb run` under faults a careless operator makes: a second daemon on the
same interface, a reboot that took the pinned maps but left the state file, a
state file that is damaged, a daemon killed between two named steps."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from control.l4lb.v1 import l4lb_pb2 as pb
from l4lb import bpf, consts
from test_server import L4LB, Server

pytestmark = pytest.mark.kernel
VIP = pb.VipId(address="198.18.10.50", port=80, protocol="tcp")
BACKENDS = {"198.18.2.1": 1, "198.18.2.2": 3}


def run_args(s: Server, *extra) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{s.ns}", L4LB, "run", "--interface", s.ifname, "--listen",
            f"unix:{s.sock}.2", "--state-dir", str(s.state), "--max-vips", "8", "--max-backends", "64",
            "--ct-size", "4096", *extra]


def configure(s: Server) -> None:
    with s.client() as c:
        c.call("SetGateway", pb.SetGatewayRequest(mac="02:00:00:00:00:01"))
        c.call("AddVip", pb.AddVipRequest(id=VIP, backends=[pb.Backend(address=a, weight=w)
                                                            for a, w in BACKENDS.items()]))


def picks(s: Server) -> list[tuple[str, str]]:
    with s.client() as c:
        return [(r.verdict, r.backend) for r in (
            c.call("LookupFlow", pb.LookupFlowRequest(src="198.18.0.9", dst=VIP.address, sport=p, dport=80,
                                                      protocol="tcp")) for p in range(40000, 40040))]


def test_a_second_daemon_on_the_interface_exits_2_naming_the_owner(tmp_path):
    s = Server(tmp_path)
    try:
        s.start()
        configure(s)
        other_state = tmp_path / "other"
        r = subprocess.run(run_args(s, "--state-dir", str(other_state)), capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2
        assert f"pid {s.proc.pid}" in r.stderr and s.ifname in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        with s.client() as c:  # the owner is untouched
            assert [v.id.address for v in c.call("ListVips", pb.ListVipsRequest()).vips] == [VIP.address]
        assert not (other_state / s.ifname / "state.json").exists()
    finally:
        s.cleanup()


def test_after_a_reboot_the_state_file_is_restored_into_fresh_maps(tmp_path):
    s = Server(tmp_path)
    try:
        s.start()
        configure(s)
        before = picks(s)
        assert {b for _, b in before} == set(BACKENDS)
        s.stop()
        # a reboot: the program is gone, and so are the pins; the state directory stays
        subprocess.run(["ip", "-n", s.ns, "link", "set", s.ifname, "xdp", "off"], check=True)
        bpf.remove_pins(f"{consts.PIN_ROOT}/{s.ifname}")
        saved = json.loads((s.state / s.ifname / "state.json").read_text())
        s.start()
        with s.client() as c:
            v = c.call("GetVip", pb.GetVipRequest(id=VIP))
            assert {b.address: b.weight for b in v.backends} == BACKENDS
        assert picks(s) == before
        after = json.loads((s.state / s.ifname / "state.json").read_text())
        assert after["state"]["vips"] == saved["state"]["vips"]
        assert "restored 1 VIPs" in s.log.read_text()
    finally:
        s.cleanup()


@pytest.mark.parametrize("damage, message", [
    (lambda d: d.pop("state"), "no 'state' section"),
    (lambda d: d["state"]["vips"][0].update(vip_id=99), "VIP id 99 is out of range"),
    (lambda d: d["state"]["vips"][0]["backends"].update({"198.18.2.77": 1}), "198.18.2.77, which has no index"),
    (lambda d: d["state"]["vips"][0].pop("ring"), "missing key 'ring'"),
    (lambda d: d["capacity"].update(bogus=1), "capacity section is malformed"),
])
def test_a_damaged_state_file_is_refused_in_one_line(tmp_path, damage, message):
    s = Server(tmp_path)
    try:
        s.start()
        configure(s)
        s.stop()
        path = s.state / s.ifname / "state.json"
        doc = json.loads(path.read_text())
        damage(doc)
        path.write_text(json.dumps(doc))
        r = subprocess.run(run_args(s), capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert message in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    finally:
        s.cleanup()


@pytest.mark.parametrize("point", ["persist.renamed:2", "sync.ring-written", "sync.vip-written"])  # a start saves once
def test_l4lb_run_killed_between_named_steps_comes_back_consistent(tmp_path, point):
    s = Server(tmp_path)
    try:
        s.start()
        configure(s)
        s.stop()
        os.environ["L4LB_CRASH_AT"] = point
        try:
            s.start()
        finally:
            del os.environ["L4LB_CRASH_AT"]
        with s.client() as c, pytest.raises(Exception):
            c.call("AddBackends", pb.AddBackendsRequest(id=VIP, backends=[pb.Backend(address="198.18.2.9", weight=2)]))
        assert s.proc.wait(timeout=30) == -9
        s.start()
        with s.client() as c:
            v = c.call("GetVip", pb.GetVipRequest(id=VIP))
            listed = {b.address: b.weight for b in v.backends}
        # the change was saved before the kill (the first point is after the rename): it is whole now
        assert listed == {**BACKENDS, "198.18.2.9": 2}
        got = {b for verdict, b in picks(s) if verdict == "TX"}
        assert got <= set(listed) and "198.18.2.9" in got
    finally:
        s.cleanup()


def test_run_with_detach_leaves_no_trace_of_either_program(tmp_path):
    s = Server(tmp_path)
    try:
        s.start("--detach")
        configure(s)
        with s.client() as c:  # a tunnel check: the probe encapsulation program is attached
            c.call("SetHealthCheck", pb.SetHealthCheckRequest(id=VIP, health=pb.HealthCheck(kind="tcp")))
        qdisc = lambda: subprocess.run(["tc", "-n", s.ns, "qdisc", "show", "dev", s.ifname],  # noqa: E731
                                       capture_output=True, text=True).stdout
        filters = lambda: subprocess.run(["tc", "-n", s.ns, "filter", "show", "dev", s.ifname, "egress"],  # noqa: E731
                                         capture_output=True, text=True).stdout
        deadline = time.monotonic() + 20
        while "probe_encap" not in filters() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "clsact" in qdisc() and "probe_encap" in filters()
        assert s.xdp_id()
        s.stop()
        assert s.proc.returncode == 0
        assert not s.xdp_id() and "clsact" not in qdisc() and not filters().strip()
        assert not os.path.exists(f"{consts.PIN_ROOT}/{s.ifname}")
    finally:
        s.cleanup()
