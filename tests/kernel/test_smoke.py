"""First proofs that the loaded program balances: one VIP, one packet each way."""
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from lbfixture import CLIENT_MAC, GW_MAC, LB_MAC


def test_syn_to_vip_is_encapsulated_to_its_only_backend(lb):
    lb.add_vip("198.18.10.10", 80, "tcp", {"198.18.2.1": 1})
    pkt = Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src="198.18.0.5", dst="198.18.10.10") / TCP(sport=40000, dport=80, flags="S")
    r = lb.run(pkt)
    assert r.verdict == "TX"
    out = r.eth
    assert out.dst == GW_MAC and out.src == LB_MAC
    assert out[IP].proto == 4 and out[IP].dst == "198.18.2.1"
    assert r.data[14 + 20:] == bytes(pkt)[14:]
    assert lb.stats()["tx"] == 1


def test_packet_for_no_vip_passes_untouched(lb):
    lb.add_vip("198.18.10.10", 80, "tcp", {"198.18.2.1": 1})
    pkt = Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src="198.18.0.5", dst="198.18.1.1") / TCP(sport=40000, dport=80)
    r = lb.run(pkt)
    assert r.verdict == "PASS" and r.data == bytes(pkt)
    assert lb.stats()["pass"] == 1
