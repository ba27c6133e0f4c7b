"""next_hop fib end to end: `l4lb run --next-hop fib` sends encapsulated
packets where the LB namespace's routes and neighbours say, with no RPC when
they change: a route that turns unreachable and comes back; a router that
changes its MAC (and says so with a gratuitous ARP); a neighbour entry that is gone is
resolved by the kernel from the first packet the program passes up; and an
LB with two interfaces takes traffic on one and sends it out of the other
(XDP_REDIRECT through the devmap)."""
from __future__ import annotations

import os
import socket

import pytest
from scapy.layers.l2 import ARP, Ether

from control.l4lb.v1 import l4lb_pb2 as pb
from control.launcher import launcher
from e2e_util import by_backend, close_all, delta, open_many, settle
from l4lb.testbed import Testbed, TestbedError
from l4lb.testbed.common import NETNS_DIR
from l4lb.testbed.tunnels import give_back, take_decap

NEW_ROUTER_MAC = "02:00:00:00:0e:01"
LINK2 = ("198.18.5.1", "198.18.5.2", 30)  # router, LB: the LB's second link


@pytest.fixture(scope="module")
def bed():
    with Testbed(decap="xdp", launcher=launcher()) as tb:
        tb.lb.sysctl({"net.ipv4.conf.all.forwarding": 1, "net.ipv6.conf.all.forwarding": 1})
        restart(tb, ["--next-hop", "fib"])
        yield tb


def restart(bed, extra: list[str]) -> None:
    bed.lb.stop()
    bed.lb.run_args = [a for a in bed.lb.run_args if a not in ("--next-hop", "fib")] + extra
    bed.lb.start()
    bed.lb.wait_healthy()


def lb_ip(bed, *args: str) -> None:
    import subprocess  # noqa: PLC0415

    subprocess.run(bed.lb.nsenter() + ["ip", *args], check=True, capture_output=True)


def router_ip(bed, *args: str) -> None:
    import subprocess  # noqa: PLC0415

    subprocess.run(bed.router.nsenter() + ["ip", *args], check=True, capture_output=True)


def announce(bed, mac: str) -> None:
    """A gratuitous ARP from the router's end of the LB link, as a router
    sends when its MAC changes."""
    frame = Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=1, hwsrc=mac, psrc="198.18.1.1", hwdst="00:00:00:00:00:00", pdst="198.18.1.1")
    sock = bed.router.socket(socket.AF_PACKET, socket.SOCK_RAW)
    try:
        sock.bind(("lb", 0))
        sock.send(bytes(frame))
    finally:
        sock.close()


def answered(bed, address: str, n: int) -> list:
    conns = open_many(bed, address, n)
    assert all(c.backend for c in conns)
    return conns


def every_backend_answers_through_the_fib(bed, lb, address: str) -> None:
    """20 connections reach every backend, the LB sent their packets (XDP_TX)
    and the FIB refused none."""
    before = lb.counters()
    conns = answered(bed, address, 20)
    assert len(by_backend(conns)) == len(bed.backends)
    close_all(conns)
    moved = delta(settle(lb.counters), before)
    assert moved.get("tx", 0) >= 20 * 4 and not moved.get("fib_drop")


def test_status_says_fib(lb):
    s = lb.call("GetStatus", pb.GetStatusRequest())
    assert s.next_hop == "fib"


def test_a_route_change_is_followed_without_any_rpc(bed, lb):
    """The LB's route to the backends turns unreachable, then comes back: the
    program drops (fib_drop) and then sends again, with no call to the LB."""
    with lb.vip(bed.vip4(3), {b.addr4: 1 for b in bed.backends}) as vid:
        close_all(answered(bed, vid.address, 10))
        lb_ip(bed, "route", "add", "unreachable", "198.18.2.0/24")
        try:
            before = lb.counters()
            with pytest.raises(TestbedError):
                bed.clients[0].connect(vid.address, timeout=1.0)
            assert delta(lb.counters(), before).get("fib_drop", 0) >= 1
        finally:
            lb_ip(bed, "route", "del", "unreachable", "198.18.2.0/24")
        every_backend_answers_through_the_fib(bed, lb, vid.address)


def test_a_router_mac_change_is_followed_without_any_rpc(bed, lb):
    """The router takes a new MAC and announces it (gratuitous ARP); the LB's
    kernel updates its neighbour entry and the program's next packets go to
    the new MAC, while the configured gateway MAC stays the old one."""
    with lb.vip(bed.vip4(6), {b.addr4: 1 for b in bed.backends}) as vid:
        close_all(answered(bed, vid.address, 10))
        old_mac = bed.gateway_mac
        router_ip(bed, "link", "set", "dev", "lb", "address", NEW_ROUTER_MAC)
        try:
            announce(bed, NEW_ROUTER_MAC)
            every_backend_answers_through_the_fib(bed, lb, vid.address)
            assert lb.call("GetGateway", pb.GetGatewayRequest()).mac == old_mac, \
                "the configured gateway is the old MAC: the FIB, not the gateway, found the router"
        finally:
            router_ip(bed, "link", "set", "dev", "lb", "address", old_mac)
            announce(bed, old_mac)


def test_a_missing_neighbour_is_resolved_from_the_first_packet_passed_up(bed, lb):
    """The backends' route points at a second address of the router that the
    LB has never heard from: the first packet finds no neighbour entry."""
    router_ip(bed, "addr", "add", "198.18.1.3/24", "dev", "lb")
    lb_ip(bed, "route", "add", "198.18.2.0/24", "via", "198.18.1.3")
    try:
        with lb.vip(bed.vip4(4), {b.addr4: 1 for b in bed.backends}) as vid:
            before = lb.counters()
            c = bed.clients[0].connect(vid.address)
            assert c.ask() in {b.role for b in bed.backends}, "the SYN the program passed up was forwarded"
            c.close()
            moved = delta(settle(lb.counters), before)
            assert moved.get("fib_no_neigh") == 1, "one packet passed up; the kernel resolved the neighbour"
            assert moved.get("tx", 0) >= 3, "the later packets went out from XDP"
    finally:
        lb_ip(bed, "route", "del", "198.18.2.0/24", "via", "198.18.1.3")
        router_ip(bed, "addr", "del", "198.18.1.3/24", "dev", "lb")


def test_traffic_in_on_one_interface_leaves_on_the_other(bed, lb):
    """A second link between the router and the LB; the LB routes the backends
    over it; `l4lb run --interface A --interface B`: client packets come in on
    A (the router routes the VIPs there) and leave, encapsulated, from B."""
    router_end, lb_end, plen = LINK2
    fd = os.open(NETNS_DIR / bed.lb.ns, os.O_RDONLY)
    try:
        bed.router.ipr.link("add", ifname="lb2", kind="veth", num_tx_queues=2, num_rx_queues=2,
                            peer={"ifname": "up2", "net_ns_fd": fd, "num_tx_queues": 2, "num_rx_queues": 2})
    finally:
        os.close(fd)
    router_ip(bed, "addr", "add", f"{router_end}/{plen}", "dev", "lb2")
    router_ip(bed, "link", "set", "lb2", "up")
    lb_ip(bed, "addr", "add", f"{lb_end}/{plen}", "dev", "up2")
    lb_ip(bed, "link", "set", "up2", "up")
    lb_ip(bed, "route", "add", "198.18.2.0/24", "via", router_end, "dev", "up2")
    # a veth only takes redirected frames when its peer runs XDP (or GRO): a pass program
    pass_prog = take_decap()
    try:
        bed.router.run(pass_prog.attach, "lb2", "native")
        restart(bed, ["--next-hop", "fib", "--interface", "up2"])
        lb.reconnect()
        s = lb.call("GetStatus", pb.GetStatusRequest())
        assert list(s.interfaces) == [bed.lb.ifname, "up2"]
        with lb.vip(bed.vip4(5), {b.addr4: 1 for b in bed.backends}) as vid:
            rx0 = bed.router.link_stats("lb2")["rx_packets"]
            before = lb.counters()
            conns = answered(bed, vid.address, 20)
            close_all(conns)
            moved = delta(settle(lb.counters), before)
            assert moved.get("tx", 0) >= 20 * 4
            assert moved.get("redirect") == moved["tx"], "every encapsulated packet left by the other interface"
            assert bed.router.link_stats("lb2")["rx_packets"] - rx0 >= moved["tx"]
    finally:
        give_back(pass_prog)
