"""A control-plane restart under a fixed-rate, sequence-numbered UDP stream
through the attached program: no packet lost, same program, state and
counters recovered."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from control.l4lb.v1 import l4lb_pb2 as pb
from test_server import Server, _ip

pytestmark = pytest.mark.kernel
RATE, SECONDS = 500, 14

RECEIVER = textwrap.dedent("""
    import json, socket, struct, sys, time
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    s.bind((sys.argv[1], 0))
    s.settimeout(0.5)
    seqs, end = [], time.monotonic() + float(sys.argv[2])
    print("ready", flush=True)
    while time.monotonic() < end:
        try:
            frame, addr = s.recvfrom(2048)
        except socket.timeout:
            continue
        if addr[2] == socket.PACKET_OUTGOING or frame[23] != 4:
            continue  # only IPIP frames that arrive
        inner = 14 + 20
        if frame[inner + 9] == 17 and frame[inner + 20 + 8:inner + 20 + 12] == b"SEQ:":
            seqs.append(struct.unpack("!I", frame[inner + 20 + 12:inner + 20 + 16])[0])
    print(json.dumps(seqs))
""")

SENDER = textwrap.dedent("""
    import socket, struct, sys, time
    rate, count = int(sys.argv[1]), int(sys.argv[2])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    start = time.monotonic()
    for i in range(count):
        while time.monotonic() < start + i / rate:
            time.sleep(0.0005)
        s.sendto(b"SEQ:" + struct.pack("!I", i), ("198.18.10.10", 5000))
    print(count)
""")


def test_restart_under_traffic_loses_no_packet(tmp_path):
    s = Server(tmp_path)
    cl = f"l4lbt-{uuid.uuid4().hex[:8]}"
    try:
        _ip("netns", "add", cl)
        _ip("-n", s.ns, "link", "set", "peer0", "netns", cl)
        _ip("-n", s.ns, "addr", "add", "198.18.1.1/24", "dev", s.ifname)
        _ip("-n", cl, "addr", "add", "198.18.1.2/24", "dev", "peer0")
        _ip("-n", cl, "link", "set", "peer0", "up")
        _ip("-n", cl, "route", "add", "198.18.10.0/24", "via", "198.18.1.1")
        # XDP_TX towards a veth is only delivered when the peer runs XDP too
        subprocess.run(["nsenter", f"--net=/run/netns/{cl}", sys.executable, "-c",
                        "from l4lb import bpf; bpf.load_decap().attach('peer0', 'native')"],
                       check=True, capture_output=True, timeout=120)
        mac = json.loads(subprocess.run(["ip", "-n", cl, "-j", "link", "show", "peer0"], capture_output=True,
                                        text=True).stdout)[0]["address"]
        s.start()
        vid = pb.VipId(address="198.18.10.10", port=5000, protocol="udp")
        with s.client() as c:
            c.call("SetGateway", pb.SetGatewayRequest(mac=mac))
            c.call("AddVip", pb.AddVipRequest(id=vid, backends=[pb.Backend(address="198.18.2.1", weight=1)]))
        prog_id = s.xdp_id()
        recv = subprocess.Popen(["ip", "netns", "exec", cl, sys.executable, "-c", RECEIVER, "peer0", str(SECONDS + 4)],
                                stdout=subprocess.PIPE, text=True)
        assert recv.stdout.readline().strip() == "ready"
        send = subprocess.Popen(["ip", "netns", "exec", cl, sys.executable, "-c", SENDER, str(RATE), str(RATE * SECONDS)],
                                stdout=subprocess.PIPE, text=True)
        time.sleep(2)
        s.stop()  # the control plane is down; the program keeps forwarding
        assert s.xdp_id() == prog_id
        s.start()
        assert send.wait(timeout=SECONDS + 30) == 0
        seqs = json.loads(recv.communicate(timeout=SECONDS + 30)[0].strip().splitlines()[-1])
        sent = RATE * SECONDS
        missing = sorted(set(range(sent)) - set(seqs))
        assert not missing, f"{len(missing)} of {sent} lost, first {missing[:10]}"
        assert s.xdp_id() == prog_id
        with s.client() as c:
            v = c.call("GetVip", pb.GetVipRequest(id=vid))
            assert [b.address for b in v.backends] == ["198.18.2.1"]
            assert v.packets == sent  # counters survived the restart
            st = c.call("GetStats", pb.GetStatsRequest())
            assert st.counters["tx"] >= sent and st.counters["no_backend"] == 0
    finally:
        s.cleanup()
        subprocess.run(["ip", "netns", "del", cl], capture_output=True)
