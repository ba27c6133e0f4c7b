"""`l4lb run` on several interfaces and with next_hop fib: one program and one
set of maps on every interface, shown by GetStatus and gone from all with
--detach; fib refused, with one line and nothing changed, while an interface
does not forward."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpc
import pytest

from control.l4lb.v1 import l4lb_pb2 as pb
from l4lb import consts
from test_server import L4LB, Server

pytestmark = pytest.mark.kernel


def forwarding(s: Server, on: bool) -> None:
    for key in ("net.ipv4.conf.all.forwarding", "net.ipv6.conf.all.forwarding"):
        subprocess.run(["ip", "netns", "exec", s.ns, "sysctl", "-qw", f"{key}={int(on)}"], check=True)


def xdp_id(s: Server, ifname: str) -> str:
    out = subprocess.run(["ip", "-n", s.ns, "-d", "link", "show", ifname], capture_output=True, text=True).stdout
    return out.split("prog/xdp id ")[1].split()[0] if "prog/xdp id " in out else ""


def ifindex(s: Server, ifname: str) -> int:
    out = subprocess.run(["ip", "-n", s.ns, "-j", "link", "show", ifname], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)[0]["ifindex"]


def u32(v) -> int:
    """A u32 as bpftool prints it: a number (with BTF) or its bytes in hex."""
    return v if isinstance(v, int) else int.from_bytes(bytes(int(b, 16) for b in v), "little")


def run_once(s: Server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", f"--net=/run/netns/{s.ns}", L4LB, "run", "--listen", f"unix:{s.sock}",
                           "--state-dir", str(s.state), "--max-vips", "8", "--max-backends", "64",
                           "--ct-size", "4096", *args], capture_output=True, text=True, timeout=120)


def test_one_program_on_two_interfaces_and_detach_leaves_neither(tmp_path):
    s = Server(tmp_path)
    pins = f"{consts.PIN_ROOT}/{s.ifname}"
    try:
        s.start("--interface", "peer0", "--detach")
        with s.client() as c:
            st = c.call("GetStatus", pb.GetStatusRequest())
        assert list(st.interfaces) == [s.ifname, "peer0"] and st.interface == s.ifname
        assert st.next_hop == "gateway"
        assert xdp_id(s, s.ifname) and xdp_id(s, s.ifname) == xdp_id(s, "peer0") == str(st.program_id)
        r = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", f"{pins}/tx_port_slots"],
                           capture_output=True, text=True, check=True)
        slots = {u32(e["key"]): u32(e["value"]) for e in json.loads(r.stdout)}
        assert slots == {ifindex(s, s.ifname): 0, ifindex(s, "peer0"): 1}
        s.stop()
        assert s.proc.returncode == 0
        assert xdp_id(s, s.ifname) == xdp_id(s, "peer0") == "", "detached from both"
        assert not Path(pins).exists(), "no pinned maps"
        assert not (s.state / s.ifname / "state.json").exists()
    finally:
        s.cleanup()
        subprocess.run(["ip", "-n", s.ns, "link", "set", "peer0", "xdp", "off"], capture_output=True)


def test_an_interface_given_twice_is_refused_in_one_line(tmp_path):
    s = Server(tmp_path)
    try:
        r = run_once(s, "--interface", s.ifname, "--interface", s.ifname)
        assert r.returncode == 2
        assert "given twice" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert xdp_id(s, s.ifname) == ""
    finally:
        s.cleanup()


def test_fib_is_refused_while_the_interface_does_not_forward_and_nothing_is_made(tmp_path):
    s = Server(tmp_path)
    try:
        forwarding(s, False)
        r = run_once(s, "--interface", s.ifname, "--next-hop", "fib")
        assert r.returncode == 2
        assert f"net.ipv4.conf.{s.ifname}.forwarding" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert xdp_id(s, s.ifname) == ""
        assert not Path(consts.PIN_ROOT, s.ifname).exists()
        assert not (s.state / s.ifname / "state.json").exists()
    finally:
        s.cleanup()


def test_fib_through_apply_only_with_forwarding_and_kept_over_a_restart(tmp_path):
    s = Server(tmp_path)
    try:
        forwarding(s, False)
        s.start()
        with s.client() as c:
            with pytest.raises(grpc.RpcError) as e:
                c.call("Apply", pb.ApplyRequest(config_yaml="next_hop: fib\n"))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "forwarding" in e.value.details()
            assert c.call("GetStatus", pb.GetStatusRequest()).next_hop == "gateway"
            forwarding(s, True)
            c.call("Apply", pb.ApplyRequest(config_yaml="next_hop: fib\n"))
            assert c.call("GetStatus", pb.GetStatusRequest()).next_hop == "fib"
            c.call("Apply", pb.ApplyRequest(config_yaml="mtu: 1500\n"))  # a file without next_hop keeps it
            assert c.call("GetStatus", pb.GetStatusRequest()).next_hop == "fib"
        s.stop()
        s.start()
        with s.client() as c:
            assert c.call("GetStatus", pb.GetStatusRequest()).next_hop == "fib"
        r = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", f"{consts.PIN_ROOT}/{s.ifname}/config"],
                           capture_output=True, text=True, check=True)
        value = json.loads(r.stdout)[0]["value"]
        if isinstance(value, list):  # no BTF: the bytes; gw_mac[6], configured, next_hop
            value = {"configured": int(value[6], 16), "next_hop": int(value[7], 16)}
        assert value["next_hop"] == consts.NEXT_HOP_FIB and value["configured"] == 1
    finally:
        s.cleanup()


def test_a_restart_without_an_interface_detaches_the_program_from_it(tmp_path):
    s = Server(tmp_path)
    try:
        s.start("--interface", "peer0")
        prog = xdp_id(s, s.ifname)
        assert prog and xdp_id(s, "peer0") == prog
        s.stop()
        assert xdp_id(s, "peer0") == prog, "a stop leaves the program attached everywhere"
        s.start()
        assert xdp_id(s, s.ifname) == prog, "kept where it is still wanted"
        assert xdp_id(s, "peer0") == "", "gone from the interface left out"
        with s.client() as c:
            assert list(c.call("GetStatus", pb.GetStatusRequest()).interfaces) == [s.ifname]
        assert "detached from peer0" in s.log.read_text()
    finally:
        s.cleanup()
        subprocess.run(["ip", "-n", s.ns, "link", "set", "peer0", "xdp", "off"], capture_output=True)
