"""The hardware traffic generators' configurations: pktgen's, checked from its
--dry-run, and the TRex profile's packet templates, run through the real
balancer (BPF_PROG_TEST_RUN) to the VIP's backends."""
import ipaddress
import os
from collections import Counter

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from bench.hardware import pktgen, trex_vip
from l4lb import bpf, consts, flowhash, maglev, libbpf
from l4lb.dataplane import Dataplane, RuntimeConfig
from l4lb.model import VipKey, VipSpec
from l4lb.state import LbState

GW_MAC = "02:00:00:00:00:01"
LB_MAC = "02:00:00:00:01:01"
BACKENDS = [f"198.18.2.{i}" for i in range(1, 9)]


# ---- pktgen --------------------------------------------------------------------------------

def dry_run(capsys, *args) -> tuple[list[str], list[tuple[str, str]]]:
    assert pktgen.main(["--dry-run", *args]) == 0
    out = capsys.readouterr().out.splitlines()
    header = [ln[2:] for ln in out if ln.startswith("# ")]
    cmds = []
    for ln in out:
        if ln.startswith("/proc/net/pktgen/"):
            path, _, cmd = ln.partition(": ")
            cmds.append((path.removeprefix("/proc/net/pktgen/"), cmd))
    return header, cmds


def test_pktgen_dry_run_configures_every_thread(capsys):
    header, cmds = dry_run(capsys, "--dev", "eth9", "--dst-mac", "02:00:00:00:01:01",
                           "--vip", "198.18.10.10", "--port", "53", "--flows", "65536",
                           "--threads", "2", "--rate-pps", "2000000", "--count", "1000001")
    assert cmds[0] == ("pgctrl", "reset")
    assert cmds[-1] == ("pgctrl", "start")
    assert ("kpktgend_0", "add_device eth9@0") in cmds
    assert ("kpktgend_1", "add_device eth9@1") in cmds
    for t, dev in enumerate(("eth9@0", "eth9@1")):
        mine = [c for d, c in cmds if d == dev]
        assert "dst 198.18.10.10" in mine
        assert "dst_mac 02:00:00:00:01:01" in mine
        assert "udp_dst_min 53" in mine and "udp_dst_max 53" in mine
        # sources: 198.18.0.1 .. .254 (pktgen leaves the range's upper end out)
        assert "src_min 198.18.0.1" in mine and "src_max 198.18.0.255" in mine
        assert "flag IPSRC_RND" in mine and "flag UDPSRC_RND" in mine
        # 254 sources x 259 ports >= 65536 flows
        assert "udp_src_min 1024" in mine and "udp_src_max 1283" in mine
        assert "ratep 1000000" in mine  # the rate split between the threads
        assert f"queue_map_min {t}" in mine and f"queue_map_max {t}" in mine
        assert "clone_skb 0" in mine and "pkt_size 64" in mine
        assert not any(c.startswith(("flows", "flowlen")) for c in mine)
    counts = [int(c.split()[1]) for d, c in cmds if c.startswith("count ")]
    assert counts == [500001, 500000]
    text = "\n".join(header)
    assert "65,786 distinct 5-tuples" in text
    assert "254 sources" in text and "259 source ports" in text
    assert "2,000,000 pps" in text and "1,000,001 packets" in text and "eth9" in text


def test_pktgen_dry_run_defaults_line_rate_and_small_flow_counts(capsys):
    _, cmds = dry_run(capsys, "--dev", "enp1s0f1", "--dst-mac", "02:00:00:00:01:02",
                      "--flows", "100", "--src", "198.18.0.0/28", "--count", "0")
    mine = [c for d, c in cmds if d == "enp1s0f1@0"]
    assert "delay 0" in mine and not any(c.startswith("ratep") for c in mine)
    assert "count 0" in mine
    assert "src_min 198.18.0.1" in mine and "src_max 198.18.0.15" in mine
    # 14 sources: 8 ports make 112 >= 100 flows
    assert "udp_src_min 1024" in mine and "udp_src_max 1032" in mine


@pytest.mark.parametrize("args", [
    ["--dst-mac", "02:00:00:00:01"],
    ["--dst-mac", "02:00:00:00:01:01", "--vip", "fd00:198:18:10::1"],
    ["--dst-mac", "02:00:00:00:01:01", "--size", "20"],
    ["--dst-mac", "02:00:00:00:01:01", "--threads", "2", "--cpus", "3"],
])
def test_pktgen_refuses_bad_settings(capsys, args):
    with pytest.raises(SystemExit) as e:
        pktgen.main(["--dev", "eth9", "--dry-run", *args])
    assert e.value.code == 2


def test_pktgen_without_dry_run_checks_the_device_before_touching_pktgen(capsys):
    assert pktgen.main(["--dev", "l4lb-no-such-dev", "--dst-mac", "02:00:00:00:01:01"]) == 2
    assert "no network device" in capsys.readouterr().err


# ---- TRex profile ---------------------------------------------------------------------------

def test_trex_profile_imports_without_trex():
    assert trex_vip.register().__class__.__name__ == "L4lbVip"
    if trex_vip.HAVE_TREX:
        pytest.skip("TRex is installed here: get_streams works")
    with pytest.raises(RuntimeError, match="trex_stl_lib"):
        trex_vip.register().get_streams(port_id=0, direction=0)


def test_trex_templates_vary_the_flow_within_the_profile_ranges():
    p = trex_vip.params(flows="4096", size="128")
    frames = trex_vip.sample_frames(500, p=p)
    lo, hi = (ipaddress.IPv4Address(a) for a in trex_vip.source_range(p))
    plo, phi = trex_vip.port_range(p)
    assert (str(lo), str(hi)) == ("198.18.0.1", "198.18.0.254")
    assert (phi - plo + 1) * 254 >= 4096
    flows = set()
    for f in frames:
        pkt = Ether(f)
        assert len(f) == 124  # 128 with the FCS the NIC adds
        assert lo <= ipaddress.IPv4Address(pkt[IP].src) <= hi
        assert plo <= pkt[TCP].sport <= phi
        assert pkt[IP].dst == "198.18.10.10" and pkt[TCP].dport == 80 and pkt[TCP].flags == "A"
        flows.add((pkt[IP].src, pkt[TCP].sport))
    assert len(flows) > 450


@pytest.fixture(scope="module")
def balancer():
    if os.geteuid() != 0:
        pytest.skip("needs root (BPF)")
    cap = consts.Capacity(max_vips=4, max_backends=64, ct_size=65536)
    prog = bpf.load_balancer(cap)
    dp = Dataplane(prog, cap)
    dp.clear()
    dp.write_config(RuntimeConfig(gateway_mac=GW_MAC), portless_vips=0)
    state = LbState(cap, dp)
    for port, proto in ((80, "tcp"), (53, "udp")):
        state.add_vip(VipSpec(VipKey.parse("198.18.10.10", port, proto), frozenset(),
                              {b: 1 for b in BACKENDS}))
    yield prog, cap
    prog.close()


@pytest.mark.kernel
@pytest.mark.parametrize("over", [{}, {"tcp_flags": "S"}, {"proto": "udp", "port": "53"}],
                         ids=["tcp-ack", "tcp-syn", "udp"])
def test_trex_templates_come_out_encapsulated_to_the_vip_backends(balancer, over):
    prog, cap = balancer
    p = trex_vip.params(flows="65536", **over)
    table = maglev.maglev_table({b: 1 for b in BACKENDS}, cap.ring_size)
    picked = Counter()
    for frame in trex_vip.sample_frames(400, seed=7, p=p):
        r = libbpf.run(prog.fd, frame)
        assert r.verdict == libbpf.XDP_TX
        d = r.data
        assert d[0:6] == bytes.fromhex(GW_MAC.replace(":", ""))
        assert d[6:12] == bytes.fromhex(LB_MAC.replace(":", ""))
        outer = IP(d[14:34])
        assert outer.proto == 4 and outer.ttl == 64
        assert outer.dst in BACKENDS
        assert d[34:] == frame[14:], "the client's packet (and padding) intact inside"
        inner = Ether(frame)
        l4 = inner[TCP] if p["proto"] == "tcp" else inner[UDP]
        h = flowhash.flow_hash(inner[IP].src, inner[IP].dst, l4.sport, l4.dport,
                               consts.PROTOCOLS[p["proto"]])
        assert outer.dst == table[flowhash.ring_slot(h, cap.ring_size)]
        picked[outer.dst] += 1
    # the flows spread over the backends: every one takes some, none most
    assert len(picked) == len(BACKENDS)
    assert max(picked.values()) < 0.25 * sum(picked.values())
