"""Real TCP connections through the LB: where they go, what everybody counted,
and the controls that show each check can fail."""
from __future__ import annotations

import subprocess
from dataclasses import dataclass

import pytest

from e2e_util import ALPHA, binomial_bounds, by_backend, canonical, close_all, delta, settle
from l4lb.testbed import TestbedError, ip_source

WEIGHTS = {"b1": 1, "b2": 2, "b3": 3}
CONNECTIONS = 300


@dataclass
class Burst:
    vid: object
    weights: dict[str, int]  # backend address -> weight
    conns: list
    lookups: dict  # (client address, sport) -> backend address the LB's table holds
    lb: dict  # LB counter changes
    vip_packets: int
    client_segments: int
    decap: dict[str, dict[str, int]]  # backend -> decap counter changes
    csum_errors: dict[str, int]
    frames: list  # what the LB's stack saw on its interface meanwhile
    lb_own_pinged: bool


@pytest.fixture(scope="module")
def burst(bed, lb):
    """CONNECTIONS connections from both clients to one IPv4 VIP whose
    backends have weights 1:2:3, with every counter read before and after."""
    weights = {b.addr4: WEIGHTS[b.role] for b in bed.backends}
    with lb.vip(bed.vip4(0), weights) as vid:
        decap0 = {b.role: b.decap_counts() for b in bed.backends}
        csum0 = bed.csum_errors()
        lb0, seg0, pk0 = lb.counters(), bed.client_segments(), lb.vip_packets(vid)
        with bed.lb.sniff() as frames:
            conns = []
            for i in range(CONNECTIONS):
                c = bed.clients[i % len(bed.clients)].connect(vid.address)
                c.ask("hello")
                conns.append(c)
            # a positive control for the capture: traffic to the LB's own address shows
            pinged = bed.clients[0].ping(bed.lb.addr4) is not None
            close_all(conns)
            seg1 = settle(bed.client_segments)
            pk1 = settle(lambda: lb.vip_packets(vid))
        lb1 = lb.counters()
        decap1 = settle(lambda: {b.role: b.decap_counts() for b in bed.backends})
        lookups = {(c.src, c.sport): lb.lookup(c.src, vid.address, c.sport, vid.port) for c in conns}
        yield Burst(vid, weights, conns, lookups, delta(lb1, lb0), pk1 - pk0, seg1 - seg0,
                    {r: delta(decap1[r], decap0[r]) for r in decap1}, delta(bed.csum_errors(), csum0),
                    list(frames), pinged)


def test_connections_spread_over_backends_in_proportion_to_weights(bed, lb, burst):
    """Each backend's share is its share of the Maglev table (weights 1:2:3 give
    ~1/6, 2/6, 3/6); with random source ports the count of a backend is
    Binomial(n, share), and must lie in its exact acceptance interval at
    significance ALPHA (split over the backends, Bonferroni)."""
    got = by_backend(burst.conns)
    shares = lb.table_shares(burst.weights)
    for b in bed.backends:
        share = shares[b.addr4]
        assert abs(share - WEIGHTS[b.role] / sum(WEIGHTS.values())) < 0.01, "the table follows the weights"
        lo, hi = binomial_bounds(CONNECTIONS, share, ALPHA / len(bed.backends))
        assert lo <= got[b.role] <= hi, (
            f"{b.role}: {got[b.role]} of {CONNECTIONS} connections, expected {lo}-{hi} "
            f"(share {share:.3f}, significance {ALPHA})")


def test_each_connection_lands_where_maglev_predicts_and_the_lb_remembers_it(bed, lb, burst):
    for c in burst.conns:
        want = lb.predict(burst.vid, c.src, c.sport, burst.weights)
        answered = bed.backend(c.backend).addr4
        assert answered == want, f"{c}: answered by {c.backend}, Maglev gives {want}"
        assert burst.lookups[(c.src, c.sport)] == canonical(answered), f"{c}: the LB's connection table disagrees"


def test_lb_counters_agree_with_the_clients_and_the_backends(bed, burst):
    """Every TCP segment the clients sent is one packet for the VIP at the LB,
    one encapsulated packet sent, and one packet decapsulated at a backend; each
    connection is one new flow in the connection table."""
    sent = burst.client_segments
    assert burst.vip_packets == sent
    assert burst.lb.get("tx", 0) == sent
    assert burst.lb.get("ct_miss", 0) == burst.lb.get("ct_insert", 0) == CONNECTIONS
    assert burst.lb.get("ct_hit", 0) == sent - CONNECTIONS
    for bad in ("no_backend", "malformed", "error", "too_big", "ct_limited"):
        assert burst.lb.get(bad, 0) == 0, bad
    total = 0
    per_conn = by_backend(burst.conns)
    for b in bed.backends:
        d = burst.decap[b.role]
        assert d.get("decap6", 0) == 0, "IPv4 backends: 4in4 only"
        # a connection is at least SYN, ACK, data and FIN from the client
        assert d.get("decap4", 0) >= 4 * per_conn[b.role]
        total += d.get("decap4", 0)
    assert total == sent


def test_replies_go_straight_to_the_clients_never_through_the_lb(bed, burst):
    """DSR: the LB's stack sees every frame its program passes (the capture is
    taken after XDP); a reply coming back through the LB would be passed and
    seen. The capture works: it saw the ping to the LB's own address."""
    assert burst.lb_own_pinged
    sources = [ip_source(f) for _, f in burst.frames]
    assert bed.clients[0].addr4 in sources, "the capture saw the ping to the LB's own address"
    vips = {canonical(a) for a in bed.vips()}
    from_vips = [s for s in sources if s and canonical(s) in vips]
    assert from_vips == [], f"{len(from_vips)} frames from a VIP address reached the LB"


def test_backends_count_no_checksum_errors(burst):
    assert burst.csum_errors == {}, f"InCsumErrors moved on the backends: {burst.csum_errors}"


def test_partial_checksums_would_be_caught(bed, lb, burst):
    """The control for the check above: a client that leaves TCP checksums to
    the NIC (tx offload on) sends packets whose checksum is only the
    pseudo-header sum; after XDP_TX nobody completes it, and the backend's stack
    counts InCsumErrors and drops the SYN."""
    c = bed.clients[-1]
    before = bed.csum_errors()

    def ethtool(state):
        subprocess.run(c.nsenter() + ["ethtool", "-K", "eth0", "tx", state], check=True, capture_output=True)

    ethtool("on")
    try:
        with pytest.raises(TestbedError):
            c.connect(burst.vid.address, timeout=1.0).ask()
    finally:
        ethtool("off")
    assert sum(bed.csum_errors().values()) > sum(before.values())
    c.connect(burst.vid.address).ask()  # and with offload off again, all is well


def test_connections_fail_with_the_program_detached(bed, lb, burst):
    """With the XDP program off the LB's interface, VIP packets reach the LB's
    stack, which has no VIP and does not forward: nothing answers."""
    c = bed.clients[0]
    c.connect(burst.vid.address).ask()
    prog_id = bed.lb.detach()
    try:
        assert bed.lb.program() is None
        with pytest.raises(TestbedError, match="timed out"):
            c.connect(burst.vid.address, timeout=1.0)
    finally:
        bed.lb.attach(prog_id)
    assert bed.lb.program()[0] == prog_id
    assert c.connect(burst.vid.address).ask() in WEIGHTS


@pytest.mark.parametrize("n, p", [(300, 1 / 6), (300, 1 / 2), (150, 1 / 3)])
def test_binomial_bounds_keep_their_significance(n, p):
    """The acceptance interval's tails, summed independently, stay within alpha/2
    each, and widening them by one would not: the bounds are tight."""
    import math  # noqa: PLC0415

    alpha = ALPHA / 3
    lo, hi = binomial_bounds(n, p, alpha)
    pmf = [math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(n + 1)]
    assert sum(pmf[:lo]) <= alpha / 2 < sum(pmf[:lo + 1])
    assert sum(pmf[hi + 1:]) <= alpha / 2 < sum(pmf[hi:])
    assert lo < n * p < hi
