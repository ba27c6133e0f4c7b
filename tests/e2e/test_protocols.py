"""UDP flows, and the three encapsulations end to end: 4in4, 6in6 (IPv6 VIP,
IPv6 backends) and 4in6 (IPv4 VIP, IPv6 backends)."""
from __future__ import annotations

import pytest

from e2e_util import by_backend, close_all, delta, open_many, settle

# family -> (VIP index, IPv6 VIP?, IPv6 backends?, decap counter that moves)
FAMILIES = {"4in4": (3, False, False, "decap4"), "6in6": (3, True, True, "decap6"), "4in6": (4, False, True, "decap6")}


def _setup(bed, family):
    i, vip6, be6, counter = FAMILIES[family]
    vip = bed.vip6(i) if vip6 else bed.vip4(i)
    backends = {(b.addr6 if be6 else b.addr4): 1 for b in bed.backends}
    other = "decap4" if counter == "decap6" else "decap6"
    return vip, backends, counter, other


@pytest.mark.parametrize("family", FAMILIES)
def test_udp_flow_stays_on_one_backend(bed, lb, family):
    vip, backends, counter, other = _setup(bed, family)
    with lb.vip(vip, backends, protocol="udp") as vid:
        d0, p0 = bed.decap_totals(), lb.vip_packets(vid)
        flows = [bed.clients[i % len(bed.clients)].udp(vid.address) for i in range(24)]
        seen = {}
        for f in flows:
            names = {f.ask(f"datagram {k}") for k in range(8)}
            assert len(names) == 1, f"flow {f.src}:{f.sport} answered by {names}"
            seen[(f.src, f.sport)] = names.pop()
            want = lb.predict(vid, f.src, f.sport, backends)
            assert bed.backend_by_address(want).role == seen[(f.src, f.sport)]
        assert len(set(seen.values())) > 1, "24 flows on one backend of 3 (probability 1e-11)"
        for f in flows:
            f.close()
        packets = lb.vip_packets(vid) - p0
        moved = delta(settle(bed.decap_totals), d0)
        assert packets == 24 * 8
        assert moved.get(counter, 0) == packets and moved.get(other, 0) == 0


@pytest.mark.parametrize("family", ["6in6", "4in6"])
def test_tcp_to_ipv6_backends(bed, lb, family):
    vip, backends, counter, other = _setup(bed, family)
    vip = bed.vip6(5) if ":" in vip else bed.vip4(5)
    with lb.vip(vip, backends) as vid:
        d0, s0, p0 = bed.decap_totals(), bed.client_segments(), lb.vip_packets(vid)
        conns = open_many(bed, vid.address, 40)
        for c in conns:
            assert bed.backend(c.backend).addr6 == lb.predict(vid, c.src, c.sport, backends)
            assert c.ask("again") == c.backend
        assert len(by_backend(conns)) > 1
        close_all(conns)
        sent = settle(bed.client_segments) - s0
        moved = delta(settle(bed.decap_totals), d0)
        assert settle(lambda: lb.vip_packets(vid)) - p0 == sent
        assert moved.get(counter, 0) == sent and moved.get(other, 0) == 0
