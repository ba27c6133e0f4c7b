"""next_hop fib on the real program: the kernel's FIB of a test namespace
(l4lb.testbed.FibNet) picks the next hop's MAC and the egress interface of
every encapsulated packet. BPF_PROG_TEST_RUN looks routes up in the namespace
of the thread that runs it, so each packet runs on the namespace's thread
with lb0 as its ingress interface. Every test compares the whole change of
the global counters."""
import ipaddress
import os
import random
import threading
import time

import pytest

from l4lb import consts, flowhash, libbpf, maglev, netlink
from l4lb.testbed import FibNet
from l4lb.testbed.fibnet import (LB0_MAC, LB1_MAC, R1_MAC, R2_MAC, UNREACHABLE, VIA_R1, VIA_R1B,
                                 VIA_R2)
from lbfixture import CLIENT4, CLIENT6, GW_MAC, LB_MAC, PROMOTE, VIP4, VIP6, Flow, mac, moved

pytestmark = pytest.mark.kernel

ENCAP = {"tx": 1, "ct_miss": 1, "ct_insert": 1}
LOOKED_UP = {**ENCAP, "fib_lookup": 1}  # a fresh flow, encapsulated, its next hop asked
FLOWS = 1000
assert LB_MAC == LB0_MAC  # the fixtures' frames are addressed to lb0


@pytest.fixture(scope="module")
def net():
    with FibNet() as n:
        # one CPU for the namespace's thread: the answers kept (fib_hops) are per CPU
        n.node.run(os.sched_setaffinity, 0, {min(os.sched_getaffinity(0))})
        yield n


@pytest.fixture
def fib(lb, net):
    """The balancer in fib mode, redirecting to lb0 and lb1 (slots written
    from inside the namespace: a devmap entry names an interface of it)."""
    net.node.run(lb.dp.set_tx_ports, [net.lb0, net.lb1])
    lb.configure(next_hop="fib")
    yield lb
    net.forwarding("lb0", True)


def run(lb, net, pkt, ifindex=None):
    """One packet through the program on the namespace's thread, from lb0."""
    before = lb.dp.global_stats()
    r = net.node.run(libbpf.run, lb.prog.fd, bytes(pkt), ifindex=ifindex or net.lb0)
    return r, moved(before, lb.dp.global_stats())


KINDS = {  # name: (VIP, client, backend index in VIA_*: 0 = IPv4, 1 = IPv6)
    "4in4": (VIP4, CLIENT4, 0),
    "4in6": (VIP4, CLIENT4, 1),
    "6in6": (VIP6, CLIENT6, 1),
}


@pytest.mark.parametrize("kind", KINDS)
def test_fib_next_hop_on_the_ingress_interface_is_sent_back_with_xdp_tx(fib, net, kind):
    vip, client, fam = KINDS[kind]
    backend = VIA_R1[fam]
    fib.add_vip(vip, 80, "tcp", {backend: 1})
    f = Flow(src=client, dst=vip)
    pkt = f.packet("S", payload=b"first bytes")
    r, counters = run(fib, net, pkt)
    assert r.verdict_name == "TX"
    assert counters == LOOKED_UP
    assert r.data[0:6] == mac(R1_MAC), "destination MAC: the route's next hop, from the neighbour table"
    assert r.data[6:12] == mac(LB0_MAC), "source MAC: the egress interface's"
    # everything after the MACs is what gateway mode makes of the same packet
    fib.configure(next_hop="gateway")
    g = fib.run(pkt)
    fib.check_encap(g, pkt, backend, f.hash())
    assert g.data[0:6] == mac(GW_MAC)
    assert r.data[12:] == g.data[12:]


@pytest.mark.parametrize("fam", [0, 1], ids=["ipv4", "ipv6"])
def test_fib_next_hop_on_another_attached_interface_is_redirected(fib, net, fam):
    vip, client = (VIP4, CLIENT4) if fam == 0 else (VIP6, CLIENT6)
    backend = VIA_R2[fam]
    fib.add_vip(vip, 80, "tcp", {backend: 1})
    r, counters = run(fib, net, Flow(src=client, dst=vip).packet("S"))
    assert r.verdict_name == "REDIRECT"
    assert counters == {**LOOKED_UP, "redirect": 1}
    assert r.data[0:6] == mac(R2_MAC)
    assert r.data[6:12] == mac(LB1_MAC), "source MAC: lb1's, the egress"


def test_egress_on_an_interface_the_program_is_not_on_is_dropped(fib, net):
    net.node.run(fib.dp.set_tx_ports, [net.lb0])
    assert fib.dp.tx_ports() == {net.lb0: 0}
    fib.add_vip(VIP4, 80, "tcp", {VIA_R2[0]: 1})
    r, counters = run(fib, net, Flow().packet("S"))
    assert r.verdict_name == "DROP"
    assert counters == {"ct_miss": 1, "ct_insert": 1, "fib_lookup": 1, "fib_drop": 1}


@pytest.mark.parametrize("fam", [0, 1], ids=["ipv4", "ipv6"])
def test_next_hop_without_a_neighbour_entry_passes_up_the_stack_addressed_to_the_nic(fib, net, fam):
    vip, client = (VIP4, CLIENT4) if fam == 0 else (VIP6, CLIENT6)
    backend = VIA_R1B[fam]
    fib.add_vip(vip, 80, "tcp", {backend: 1})
    f = Flow(src=client, dst=vip)
    pkt = f.packet("S")
    r, counters = run(fib, net, pkt)
    assert r.verdict_name == "PASS"
    assert counters == {"ct_miss": 1, "ct_insert": 1, "fib_lookup": 1, "fib_no_neigh": 1}
    assert r.data[0:6] == mac(LB0_MAC), "to this NIC: the kernel takes it and forwards it"
    assert r.data[6:12] == mac(LB0_MAC)
    fib.configure(next_hop="gateway")
    g = fib.run(pkt)
    assert g.data[12:] == r.data[12:], "the encapsulated packet, as gateway mode sends it"


@pytest.mark.parametrize("fam", [0, 1], ids=["ipv4", "ipv6"])
def test_unreachable_backend_is_dropped(fib, net, fam):
    vip, client = (VIP4, CLIENT4) if fam == 0 else (VIP6, CLIENT6)
    fib.add_vip(vip, 80, "tcp", {UNREACHABLE[fam]: 1})
    r, counters = run(fib, net, Flow(src=client, dst=vip).packet("S"))
    assert r.verdict_name == "DROP"
    assert counters == {"ct_miss": 1, "ct_insert": 1, "fib_lookup": 1, "fib_drop": 1}


def test_a_change_of_tx_ports_asks_the_fib_again(fib, net):
    """A kept answer names its egress by its slot in tx_ports: when the slots
    change (l4lb run attached to other interfaces), the next packet asks the
    FIB again rather than leave by whatever interface now holds the slot."""
    fib.add_vip(VIP4, 80, "tcp", {VIA_R2[0]: 1})
    f = Flow()
    r, counters = run(fib, net, f.packet("S"))
    assert (r.verdict_name, counters) == ("REDIRECT", {**LOOKED_UP, "redirect": 1})
    r, counters = run(fib, net, f.packet("A"))
    assert (r.verdict_name, counters) == ("REDIRECT", {**PROMOTE, "redirect": 1}), "kept"
    net.node.run(fib.dp.set_tx_ports, [net.lb1, net.lb0])  # lb0 now holds lb1's slot
    assert fib.dp.tx_ports() == {net.lb1: 0, net.lb0: 1}
    r, counters = run(fib, net, f.packet("A"))
    assert (r.verdict_name, r.data[0:6]) == ("REDIRECT", mac(R2_MAC))
    assert counters == {"tx": 1, "ct_hit": 1, "redirect": 1, "fib_lookup": 1}, "asked again"


def test_ingress_interface_without_forwarding_drops(fib, net):
    fib.add_vip(VIP4, 80, "tcp", {VIA_R1[0]: 1})
    net.forwarding("lb0", False)
    r, counters = run(fib, net, Flow().packet("S"))
    assert r.verdict_name == "DROP"
    assert counters == {"ct_miss": 1, "ct_insert": 1, "fib_lookup": 1, "fib_drop": 1}
    net.forwarding("lb0", True)
    r, counters = run(fib, net, Flow().packet("A"))
    assert (r.verdict_name, counters) == ("TX", {**PROMOTE, "fib_lookup": 1}), \
        "a drop is not kept: the next packet asks again"


def test_gateway_mode_ignores_the_fib(fib, net):
    fib.add_vip(VIP4, 80, "tcp", {VIA_R2[0]: 1})
    fib.configure(next_hop="gateway")
    r, counters = run(fib, net, Flow().packet("S"))
    assert r.verdict_name == "TX"
    assert counters == ENCAP
    assert r.data[0:6] == mac(GW_MAC)


def test_every_fresh_flow_reaches_the_predicted_backend_through_its_route(fib, net):
    """1000 random flows over backends behind R1 (lb0), R2 (lb1), a next hop
    without a neighbour entry, and no route: each flow's backend is the one
    Python predicts, and its verdict and MACs are those of that backend's route."""
    backends = {VIA_R1[0]: 1, "198.18.2.2": 2, VIA_R1[1]: 1, VIA_R2[0]: 1, VIA_R2[1]: 3,
                VIA_R1B[0]: 1, UNREACHABLE[1]: 1}
    fib.add_vip(VIP4, 80, "tcp", backends)
    table = maglev.maglev_table(backends, fib.capacity.ring_size)
    rng = random.Random("l4lb fib")
    flows = {Flow(src=f"198.18.0.{rng.randrange(1, 255)}", sport=rng.randrange(1, 65536))
             for _ in range(FLOWS * 2)}
    flows = sorted(flows, key=lambda f: (f.src, f.sport))[:FLOWS]
    assert len(flows) == FLOWS

    def route(backend):  # (verdict, destination MAC, source MAC) the namespace's routes give
        a = ipaddress.ip_address(backend)
        if backend in VIA_R2 or a in ipaddress.ip_network("fd00:198:18:2:8000::/66"):
            return "REDIRECT", mac(R2_MAC), mac(LB1_MAC)
        if backend in VIA_R1B:
            return "PASS", mac(LB0_MAC), mac(LB0_MAC)
        if backend in UNREACHABLE:
            return "DROP", None, None
        return "TX", mac(R1_MAC), mac(LB0_MAC)

    want_counts = {}
    before = fib.dp.global_stats()
    for f in flows:
        backend = table[flowhash.ring_slot(f.hash(), fib.capacity.ring_size)]
        verdict, dmac, smac = route(backend)
        r = net.node.run(libbpf.run, fib.prog.fd, bytes(f.packet("S")), ifindex=net.lb0)
        assert r.verdict_name == verdict, (f, backend)
        want_counts[verdict] = want_counts.get(verdict, 0) + 1
        if dmac is None:
            continue
        assert (r.data[0:6], r.data[6:12]) == (dmac, smac), (f, backend)
        outer = r.data[30:34] if r.data[12:14] == b"\x08\x00" else r.data[38:54]
        assert str(ipaddress.ip_address(outer)) == backend, f
    sent = want_counts.get("TX", 0) + want_counts.get("REDIRECT", 0)
    assert set(want_counts) == {"TX", "REDIRECT", "PASS", "DROP"}, "every route kind was taken"
    # the answers that send are kept: one lookup per such backend; the others ask every time
    sending = {a for a in backends if route(a)[0] in ("TX", "REDIRECT")}
    lookups = want_counts["PASS"] + want_counts["DROP"] + len(sending)
    got = moved(before, fib.dp.global_stats())
    # and an answer older than FIB_HOP_TTL_NS is asked again, checked every FIB_HOP_USES uses
    assert lookups <= got.pop("fib_lookup") <= lookups + sent // consts.FIB_HOP_USES
    want = {"ct_miss": FLOWS, "ct_insert": FLOWS, "tx": sent, "redirect": want_counts["REDIRECT"],
            "fib_no_neigh": want_counts["PASS"], "fib_drop": want_counts["DROP"]}
    if fib.syn_evictions(flows):  # SYNs of two flows with one SYN slot
        want["ct_syn_evict"] = fib.syn_evictions(flows)
    assert got == want


def test_a_kept_answer_is_used_until_the_generation_changes_or_it_expires(fib, net):
    """The next hop's MAC changes in the neighbour table: packets keep the kept
    answer until user space bumps fib_gen (l4lb run does on every netlink
    event of a route, rule or neighbour), or FIB_HOP_TTL_NS has passed."""
    fib.add_vip(VIP4, 80, "tcp", {VIA_R1[0]: 1})
    f = Flow()
    r, counters = run(fib, net, f.packet("S"))
    assert (r.data[0:6], counters) == (mac(R1_MAC), LOOKED_UP)
    new_mac = "02:00:00:00:0f:09"
    net.ip("neigh", "replace", "198.18.1.2", "lladdr", new_mac, "dev", "lb0", "nud", "permanent")
    try:
        r, counters = run(fib, net, f.packet("A"))
        assert (r.data[0:6], counters) == (mac(R1_MAC), PROMOTE), "the kept answer"
        fib.dp.bump_fib_gen()
        r, counters = run(fib, net, f.packet("A"))
        assert (r.data[0:6], counters) == (mac(new_mac), {"tx": 1, "ct_hit": 1, "fib_lookup": 1})
        net.ip("neigh", "replace", "198.18.1.2", "lladdr", R1_MAC, "dev", "lb0", "nud", "permanent")
        r, counters = run(fib, net, f.packet("A"))
        assert r.data[0:6] == mac(new_mac) and "fib_lookup" not in counters
        time.sleep(consts.FIB_HOP_TTL_NS / 1e9 + 0.1)
        for n in range(1, consts.FIB_HOP_USES + 1):  # the clock is read once every FIB_HOP_USES uses
            r, counters = run(fib, net, f.packet("A"))
            if "fib_lookup" in counters:
                break
            assert r.data[0:6] == mac(new_mac)
        assert (r.data[0:6], counters) == (mac(R1_MAC), {"tx": 1, "ct_hit": 1, "fib_lookup": 1}), \
            f"expired: asked again within {consts.FIB_HOP_USES} uses (after {n})"
        assert n > 1, "not at the first use: the clock waits for FIB_HOP_USES uses"
    finally:
        net.ip("neigh", "replace", "198.18.1.2", "lladdr", R1_MAC, "dev", "lb0", "nud", "permanent")


def test_route_watch_tells_of_a_route_and_a_neighbour_change(net):
    """What l4lb run bumps fib_gen with: rtnetlink events of the namespace it
    was made in."""
    changed = threading.Event()
    watch = net.node.run(netlink.RouteWatch, changed.set)
    try:
        net.ip("route", "add", "198.18.2.240/28", "via", "198.18.1.2", "dev", "lb0")
        assert changed.wait(5), "a route added"
        changed.clear()
        net.ip("neigh", "replace", "198.18.1.4", "lladdr", "02:00:00:00:0f:0a", "dev", "lb0", "nud", "permanent")
        assert changed.wait(5), "a neighbour added"
    finally:
        watch.stop()
        net.ip("route", "del", "198.18.2.240/28")
        net.ip("neigh", "del", "198.18.1.4", "dev", "lb0")


def test_a_backend_index_given_to_another_address_forgets_the_answer_kept_for_the_old_one(fib, net):
    """fib_hops is kept per backend index: when the index goes to a backend
    whose route differs, the next packet asks the FIB for the new address
    instead of leaving by the old one's next hop."""
    fib.few_backend_indices(1)
    fib.add_vip(VIP4, 80, "tcp", {VIA_R2[0]: 1})
    r, counters = run(fib, net, Flow().packet("S"))
    assert (r.verdict_name, r.data[0:6]) == ("REDIRECT", mac(R2_MAC))
    index = fib.index_of(VIA_R2[0])
    fib.set_backends(VIP4, 80, "tcp", {})
    fib.set_backends(VIP4, 80, "tcp", {VIA_R1[0]: 1})
    assert fib.index_of(VIA_R1[0]) == (index[0], index[1] + 1), "the index is reused"
    r, counters = run(fib, net, Flow().packet("S"))
    assert (r.verdict_name, r.data[0:6], r.data[6:12]) == ("TX", mac(R1_MAC), mac(LB0_MAC))
    assert counters == LOOKED_UP


def test_an_expired_answer_whose_new_lookup_does_not_send_is_not_used_again(fib, net):
    """With no control plane to bump fib_gen, the route to a kept backend
    turns unreachable: once the answer has expired, every packet asks the FIB
    (and is dropped), not only the one that found it expired."""
    fib.add_vip(VIP4, 80, "tcp", {VIA_R1[0]: 1})
    f = Flow()
    r, counters = run(fib, net, f.packet("S"))
    assert (r.verdict_name, counters) == ("TX", LOOKED_UP)
    net.ip("route", "add", "unreachable", f"{VIA_R1[0]}/32")
    try:
        time.sleep(consts.FIB_HOP_TTL_NS / 1e9 + 0.1)
        for n in range(1, consts.FIB_HOP_USES + 1):
            r, counters = run(fib, net, f.packet("A"))
            if r.verdict_name == "DROP":
                break
        assert counters == {"ct_hit": 1, "fib_lookup": 1, "fib_drop": 1}, f"expired after {n} uses"
        for _ in range(3):
            r, counters = run(fib, net, f.packet("A"))
            assert (r.verdict_name, counters) == ("DROP", {"ct_hit": 1, "fib_lookup": 1, "fib_drop": 1}), \
                "the expired answer is not used again"
    finally:
        net.ip("route", "del", "unreachable", f"{VIA_R1[0]}/32")


def test_route_watch_tells_of_forwarding_switched_on_an_interface(net):
    """The FIB answers only for ingress interfaces that forward: switching
    forwarding is a change kept answers must not outlive (netconf events)."""
    changed = threading.Event()
    watch = net.node.run(netlink.RouteWatch, changed.set)
    try:
        for fam in (4, 6):
            for on in (0, 1):
                changed.clear()
                net.sysctl(f"net.ipv{fam}.conf.lb1.forwarding", on)
                assert changed.wait(5), f"IPv{fam} forwarding {on} on lb1"
    finally:
        watch.stop()
        net.forwarding("lb1", True)
