"""The backend the kernel picks for a fresh flow is the one Python predicts
from the flow hash (l4lb.flowhash), the ring slot and the Maglev table
(l4lb.maglev), for thousands of random flows: so any LB node, and any test,
can tell where a flow goes without asking the data plane."""
import ipaddress
import random
from collections import Counter

import numpy as np
import pytest

from l4lb import flowhash, maglev, libbpf
from lbfixture import Flow, outer_source

MIXED = {"198.18.2.1": 1, "fd00:198:18:2::1": 2, "198.18.2.2": 3, "fd00:198:18:2::2": 1, "198.18.2.3": 1}
V6 = {"fd00:198:18:2::11": 1, "fd00:198:18:2::12": 1, "fd00:198:18:2::13": 1, "fd00:198:18:2::14": 1}
FLOWS = 1000

CASES = {  # name: (VIP, port, protocol, backends, flags)
    "v4-tcp-mixed-weighted": ("198.18.10.10", 80, "tcp", MIXED, ()),
    "v6-udp": ("fd00:198:18:10::10", 443, "udp", V6, ()),
    "v4-udp-no-source-port": ("198.18.10.11", 4433, "udp", MIXED, ("no_source_port",)),
    "v6-tcp-client-affinity": ("fd00:198:18:10::11", 0, "tcp", V6, ("client_affinity",)),
}


def random_flows(rng: random.Random, vip: str, port: int, proto: str) -> list[Flow]:
    flows = set()
    while len(flows) < FLOWS:
        if ":" in vip:
            src = str(ipaddress.IPv6Address("fd00:198:18::") + rng.getrandbits(64))
        else:
            src = f"198.18.0.{rng.randrange(1, 255)}"
        dport = port or rng.randrange(1, 65536)  # a port-less VIP takes every port
        flows.add(Flow(src=src, dst=vip, sport=rng.randrange(1, 65536), dport=dport, proto=proto))
    return sorted(flows, key=lambda f: (f.src, f.sport))


def test_kernel_ring_is_the_maglev_table_of_the_vips_backends(lb):
    m = lb.capacity.ring_size
    for name, (vip, port, proto, backends, flags) in CASES.items():
        v = lb.add_vip(vip, port, proto, backends, flags)
        slots = lb.dp.ring(v.vip_id, v.ring)
        by_index = {b.index: a for a, b in lb.state.backends.items()}
        got = np.array([by_index[i] for i in slots], dtype=object)
        want = np.array(maglev.maglev_table(backends, m), dtype=object)
        assert (got == want).all(), name


@pytest.mark.parametrize("name", CASES)
def test_backend_of_every_fresh_flow_is_the_predicted_one(lb, name):
    vip, port, proto, backends, flags = CASES[name]
    m = lb.capacity.ring_size
    lb.add_vip(vip, port, proto, backends, flags)
    table = maglev.maglev_table(backends, m)
    flows = random_flows(random.Random(f"l4lb {name}"), vip, port, proto)
    before = lb.stats()
    got, want, hashes = [], [], []
    for f in flows:
        h = f.hash(flags=flags)
        hashes.append(h)
        want.append(table[flowhash.ring_slot(h, m)])
        # a SYN for TCP: a fresh pick every time; UDP flows are all new
        out = libbpf.run(lb.prog.fd, bytes(f.packet("S"))).data
        assert len(out) > 14
        got.append(out)
    after = lb.stats()
    want_counts = {"tx": FLOWS, "ct_miss": FLOWS, "ct_insert": FLOWS}
    if proto == "tcp" and lb.syn_evictions(flows):  # SYNs of two flows with one SYN slot
        want_counts["ct_syn_evict"] = lb.syn_evictions(flows)
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == want_counts
    dsts = []
    for out, h in zip(got, hashes):
        if out[12:14] == b"\x08\x00":
            dsts.append(str(ipaddress.ip_address(out[30:34])))
            assert str(ipaddress.ip_address(out[26:30])) == outer_source(lb.config.encap_v4, h)
        else:
            dsts.append(str(ipaddress.ip_address(out[38:54])))
            assert int.from_bytes(out[15:18], "big") & 0xFFFFF == h & 0xFFFFF  # flow label
            assert str(ipaddress.ip_address(out[22:38])) == outer_source(lb.config.encap_v6, h)
    mismatches = [(f, d, w) for f, d, w in zip(flows, dsts, want) if d != w]
    assert not mismatches, f"{len(mismatches)} of {FLOWS} flows off the prediction, e.g. {mismatches[:3]}"
    counts = Counter(dsts)
    if "no_source_port" in flags:
        # only (client, VIP) count: the ~250 clients spread over the backends
        assert len(counts) == len(backends)
    else:
        # shares follow the weights within a loose margin (1000 flows)
        total = sum(backends.values())
        for b, w in backends.items():
            assert abs(counts[b] / FLOWS - w / total) < 0.06, (b, counts[b])
