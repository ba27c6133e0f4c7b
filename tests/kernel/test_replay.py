"""`l4lb replay` as a user runs it: a scapy-made pcap in, verdict lines and an output pcap out."""
import re
import subprocess
import sys
from pathlib import Path

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.utils import rdpcap, wrpcap

L4LB = [str(Path(sys.executable).with_name("l4lb"))]

CONFIG = """
gateway_mac: "02:00:00:00:00:01"
encap_source: {ipv4: 198.18.20.0/24, ipv6: "fd00:198:18:20::/64"}
mtu: 1500
vips:
  - address: 198.18.10.10
    port: 80
    protocol: tcp
    backends:
      - {address: 198.18.2.1, weight: 1}
      - {address: "fd00:198:18:2::1", weight: 2}
"""


def _run(*args):
    return subprocess.run(L4LB + list(args), capture_output=True, text=True, timeout=120)


def test_replay_encapsulates_vip_packets_and_passes_the_rest(tmp_path):
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(CONFIG)
    eth = Ether(src="02:00:00:00:00:0c", dst="02:00:00:00:01:01")
    pkts = [eth / IP(src="198.18.0.5", dst="198.18.10.10") / TCP(sport=40000 + i, dport=80, flags="S") for i in range(20)]
    pkts.append(eth / IP(src="198.18.0.5", dst="198.18.1.1") / UDP(sport=5000, dport=53))
    wrpcap(str(tmp_path / "in.pcap"), pkts)
    r = _run("replay", "--config", str(cfg), "--in", str(tmp_path / "in.pcap"), "--out", str(tmp_path / "out.pcap"))
    assert r.returncode == 0, r.stderr
    assert "21 packets: PASS 1, TX 20" in r.stdout
    assert "ct_insert=20" in r.stdout and "pass=1" in r.stdout
    out = rdpcap(str(tmp_path / "out.pcap"))
    assert len(out) == 21
    kinds = set()
    for sent, got in zip(pkts[:20], out[:20]):
        assert got.dst == "02:00:00:00:00:01"
        if IPv6 in got and got[IPv6].nh == 4:
            kinds.add("4in6")
            assert got[IPv6].dst == "fd00:198:18:2::1"
            assert bytes(got[IPv6].payload) == bytes(sent[IP])
        else:
            kinds.add("4in4")
            assert got[IP].proto == 4 and got[IP].dst == "198.18.2.1"
            assert bytes(got[IP].payload) == bytes(sent[IP])
    assert kinds == {"4in4", "4in6"}  # 20 flows over a 1:2 weighting reach both
    assert bytes(out[20]) == bytes(pkts[20])
    assert r.stdout.count("\n#") + r.stdout.startswith("#") == 21


def test_replay_rejects_a_bad_config_with_one_line_and_status_2(tmp_path):
    cfg = tmp_path / "lb.yaml"
    cfg.write_text("vips: [{address: 198.18.10.10, protocol: tcp, port: 99999}]\n")
    wrpcap(str(tmp_path / "in.pcap"), [Ether() / IP(dst="198.18.1.1") / UDP()])
    r = _run("replay", "--config", str(cfg), "--in", str(tmp_path / "in.pcap"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "vips[0].port" in r.stderr and "99999" in r.stderr


def test_replay_rejects_a_truncated_pcap_with_the_packet_number(tmp_path):
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(CONFIG)
    wrpcap(str(tmp_path / "in.pcap"), [Ether() / IP(dst="198.18.1.1") / UDP()] * 3)
    data = (tmp_path / "in.pcap").read_bytes()
    (tmp_path / "cut.pcap").write_bytes(data[:-10])
    r = _run("replay", "--config", str(cfg), "--in", str(tmp_path / "cut.pcap"))
    assert r.returncode == 2 and "packet 3" in r.stderr
    (tmp_path / "junk.pcap").write_bytes(b"not a pcap at all, sorry")
    r = _run("replay", "--config", str(cfg), "--in", str(tmp_path / "junk.pcap"))
    assert r.returncode == 2 and "not a pcap file" in r.stderr


GUE_CONFIG = """
gateway_mac: "02:00:00:00:00:01"
gue_port: 5555
vips:
  - address: 198.18.10.10
    port: 80
    protocol: tcp
    encap: gue
    backends:
      - {address: 198.18.2.1, weight: 1}
      - {address: "fd00:198:18:2::1", weight: 2}
  - address: "fd00:198:18:10::10"
    port: 80
    protocol: tcp
    encap: gue
    backends:
      - {address: "fd00:198:18:2::2"}
"""


def test_replay_shows_and_writes_gue_packets(tmp_path):
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(GUE_CONFIG)
    eth = Ether(src="02:00:00:00:00:0c", dst="02:00:00:00:01:01")
    pkts = [eth / IP(src="198.18.0.5", dst="198.18.10.10") / TCP(sport=40000 + i, dport=80, flags="S") for i in range(20)]
    pkts.append(eth / IPv6(src="fd00:198:18::5", dst="fd00:198:18:10::10") / TCP(sport=40000, dport=80, flags="S"))
    wrpcap(str(tmp_path / "in.pcap"), pkts)
    r = _run("replay", "--config", str(cfg), "--in", str(tmp_path / "in.pcap"), "--out", str(tmp_path / "out.pcap"))
    assert r.returncode == 0, r.stderr
    assert "21 packets: TX 21" in r.stdout
    lines = re.findall(r"=> (gue \S+) (\S+):(\d+) -> (\S+):5555 carrying (.*)", r.stdout)
    assert len(lines) == 21
    assert {(kind, dst) for kind, _, _, dst, _ in lines} == {
        ("gue 4in4", "198.18.2.1"), ("gue 4in6", "[fd00:198:18:2::1]"), ("gue 6in6", "[fd00:198:18:2::2]")}
    assert all(int(sport) >= 49152 for _, _, sport, _, _ in lines)
    assert lines[0][4] == "198.18.0.5:40000 -> 198.18.10.10:80 tcp [S]"
    out = rdpcap(str(tmp_path / "out.pcap"))
    assert len(out) == 21
    kinds = set()
    for sent, got in zip(pkts, out):
        outer = got[IPv6] if IPv6 in got and got[IPv6].nh == 17 else got[IP]
        udp = outer[UDP]
        assert udp.dport == 5555 and udp.chksum == 0 and 49152 <= udp.sport
        assert bytes(udp.payload) == bytes(sent.payload)  # the client's packet whole
        kinds.add(f"{sent.payload.version}in{outer.version}")
    assert kinds == {"4in4", "4in6", "6in6"}
