"""The testbed's topology: network namespaces with real TCP and UDP through
the load balancer, for the end-to-end tests, `l4lb demo` and the benchmarks.

    c1 ─┐                        ┌─ b1
        ├─ brc ─ router ─ brb ───┼─ b2      each ─ between namespaces is a veth
    c2 ─┘          │             └─ b3      pair with 2 queues; brc and brb are
                   lb                       bridges in the router's namespace

* Clients (198.18.0.0/24, fd00:198:18::/64) route everything to the router.
* The router routes the VIP prefixes (198.18.10.0/24, fd00:198:18:10::/64)
  and the encapsulation sources (198.18.20.0/24, fd00:198:18:20::/64) to the
  LB's link address (198.18.1.2, fd00:198:18:1::2).
* The LB runs a real `l4lb run` (lbproc.py), attached natively to its veth;
  its gateway is the router's MAC on that link, so encapsulated packets go
  back to the router, which routes them to the backend by the outer
  destination.
* Backends (198.18.2.0/24, fd00:198:18:2::/64) hold every VIP on their
  loopback, decapsulate with the kernel's ipip/ip6tnl devices or with the XDP
  decap program (tunnels.py), and answer straight to the client through the
  router (DSR): a reply never passes the LB.

Choices the veth links force, and why:
* XDP_TX on a veth hands the frame to the peer's NAPI, which exists only when
  the peer has an XDP program or GRO enabled (kernel 5.13+). The router's end
  of the LB link gets the decap program with no addresses, which passes every
  frame: it works on every kernel with veth XDP, shows in `ip link` why
  XDP_TX works, and its `pass` counter is what the router received from the LB.
* A TCP/UDP packet sent from a namespace over a veth keeps a partial checksum
  (CHECKSUM_PARTIAL: only the pseudo-header sum) until some device fills it in;
  XDP does not, and after XDP_TX the frame has lost the skb that said so, so
  the backend would drop it as corrupt. Checksum offload is therefore off
  (ethtool -K eth0 tx off) on the clients' veths, where such packets start.
* The router's ends of the LB link and of the backends' links have a pfifo
  qdisc of 10,000 packets: the other end, with XDP attached, takes frames
  through a 256-entry ring, and without a qdisc the router drops what
  overflows it (counted as tx_dropped), where a NIC would queue; with one,
  veth holds the queue while the ring is full. The depth is fq_codel's
  default limit (this kernel has FIFO qdiscs only): the LB's NAPI thread
  shares two cores with the clients and servers, and a few milliseconds
  scheduled out fill 1,000 packets at 2 Gb/s; each overflow is a TCP loss
  (iperf3 -P 4: thousands of retransmits per run through the LB, against
  tens with 10,000).
* The LB's veth has threaded NAPI: its XDP program runs in a kernel thread of
  its own, as a real LB's runs on its own cores, instead of inline on the
  CPU that sent the frame (there, every packet through the LB would cost
  the sender's CPU the LB's work too: iperf3 0.7x direct instead of >= 0.9x).
  The threads run SCHED_FIFO (lowest priority), as a NIC's softirq work runs
  ahead of tasks: as ordinary tasks they would get a fair share of a core
  beside the clients, the servers and whatever else runs, and iperf3 through
  the LB would measure that share (0.7 - 0.8x direct on a busy machine).
* rp_filter is 0 on the backends (an inner packet that came out of a tunnel
  device arrives on a device that is not the route back to the client) and on
  the router (replies from a VIP address come from the backends' side, while
  the route to the VIPs points at the LB).
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import bpf, consts
from . import server
from .common import (ENCAP_NET4, ENCAP_NET6, MTU, NET4, NET6, NETNS_DIR, PREFIX, ROUTER_HOST, TIMEOUT,
                     VIP_NET4, VIP_NET6, TestbedError)
from .hosts import Backend, Client
from .lbproc import Lb, LbLauncher
from .namespaces import Node, create_ns, next_tag, ns_pids, remove_ns, stop_pids, stop_popen, sweep
from .tunnels import decapsulate, give_back, resolve_decap, take_decap

log = logging.getLogger("l4lb.testbed")


QUEUE_PACKETS = 10_000  # the router's queue towards an XDP end (module docstring)


@dataclass
class Options:
    decap: str = "auto"
    clients: int = 2
    backends: int = 3
    vips: int = 16  # VIP addresses per family on every backend's loopback
    lb_args: list[str] = field(default_factory=lambda: [
        "--max-vips", "32", "--max-backends", "64", "--ct-size", "65536"])


class Testbed:
    """The topology in the module docstring, built on __enter__ and removed on
    __exit__ (also when building fails half-way). launcher (an LbLauncher,
    from the caller) says how to run the LB's control plane."""

    __test__ = False

    def __init__(self, decap: str = "auto", clients: int = 2, backends: int = 3, vips: int = 16,
                 progress: Callable[[str], None] | None = None, lb_args: list[str] | None = None,
                 *, launcher: LbLauncher):
        if clients < 1 or not 1 <= backends <= 200 or not 1 <= vips <= 200:
            raise TestbedError("a testbed needs 1+ clients, 1-200 backends and 1-200 VIPs")
        self.opts = Options(decap, clients, backends, vips)
        if lb_args is not None:
            self.opts.lb_args = list(lb_args)
        self.say = progress or (lambda msg: log.info("%s", msg))
        self.launcher = launcher
        self.tag = next_tag()
        self.decap = ""
        self.nodes: list[Node] = []
        self.clients: list[Client] = []
        self.backends: list[Backend] = []
        self.router: Node | None = None
        self.lb: Lb | None = None
        self.router_program = None
        self.gateway_mac = ""
        self.workdir: Path | None = None
        self.build_seconds = 0.0
        self._nodes = contextlib.ExitStack()  # each Node: its thread and its one netlink socket

    # -- addresses
    def vip4(self, i: int = 0) -> str:
        return f"{NET4['vips']}.{10 + i}"

    def vip6(self, i: int = 0) -> str:
        return f"{NET6['vips']}::{10 + i}"

    def backend(self, name: str) -> Backend:
        for b in self.backends:
            if b.role == name:
                return b
        raise KeyError(name)

    def backend_by_address(self, address: str) -> Backend:
        a = str(ipaddress.ip_address(address))
        for b in self.backends:
            if a in (b.addr4, str(ipaddress.ip_address(b.addr6))):
                return b
        raise KeyError(address)

    def ns_name(self, role: str) -> str:
        return f"{PREFIX}-{self.tag}-{role}"

    # -- lifetime
    def __enter__(self) -> "Testbed":
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def build(self) -> None:
        t0 = time.monotonic()
        sweep(self.say)
        self.decap = resolve_decap(self.opts.decap)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-{self.tag}-"))
        self.say(f"namespaces {self.ns_name('*')} (decapsulation: {self.decap})")
        roles = ["router", "lb"] + [f"c{i + 1}" for i in range(self.opts.clients)] + \
            [f"b{i + 1}" for i in range(self.opts.backends)]
        for role in roles:
            # a namespace with this exact name can only be left over by an earlier
            # process that had this pid (the sweep took it for alive: it is us)
            remove_ns(self.ns_name(role))
            create_ns(self.ns_name(role))
            if role == "router":
                self.router = Node(role, self.ns_name(role))
                node = self.router
            elif role == "lb":
                self.lb = Lb(role, self.ns_name(role), f"{PREFIX}{self.tag}", self.workdir, self.launcher)
                self.lb.run_args = list(self.opts.lb_args)
                node = self.lb
            elif role.startswith("c"):
                node = Client(role, self.ns_name(role), int(role[1:]))
                self.clients.append(node)
            else:
                node = Backend(role, self.ns_name(role), int(role[1:]))
                self.backends.append(node)
            self.nodes.append(self._nodes.enter_context(node))
        self._sysctls()

        # the LB first: `l4lb run` compiles the balancer (seconds) while the rest is built
        self.say("LB link and `l4lb run`")
        self._lb_link()
        self.lb.start(with_config=True)

        self.say("bridges, clients, backends")
        self._bridges()
        for c in self.clients:
            self._client(c)
        for b in self.backends:
            self._backend(b)
        self.say("backend servers")
        for b in self.backends:
            b.server = server.start(b, self.vips(), self.workdir / f"{b.role}.log")
        self.say(f"decapsulation on {len(self.backends)} backends ({self.decap})")
        for b in self.backends:
            decapsulate(b, self.decap)
        self.say("XDP on the router's end of the LB link (makes XDP_TX from the LB deliverable)")
        self.router_program = take_decap()
        self.router.run(self.router_program.attach, "lb", "native")

        self._wait_links()
        for b in self.backends:
            server.wait_ready(b, self.workdir / f"{b.role}.log")
        self._wait_routes()
        self.say("waiting for `l4lb run` to serve gRPC")
        self.lb.wait_healthy()
        self.lb.napi_threaded(self.lb.ifname, realtime=True)  # its XDP program is attached: its NAPI exists
        prog = self.lb.program()
        if not prog or prog[1] != consts.PROG_BALANCER:
            raise TestbedError(f"the LB's interface runs {prog}, not the balancer")
        for b in self.backends:
            b.zero_decap_counts()
        self.build_seconds = time.monotonic() - t0
        self.say(f"testbed ready in {self.build_seconds:.1f} s")

    # -- the backends' servers
    def stop_server(self, b: Backend) -> None:
        """Stops backend b's echo server (SIGTERM, by pid): its port refuses."""
        if b.server:
            stop_popen(b.server)
            b.server = None

    def start_server(self, b: Backend) -> None:
        """Starts backend b's echo server again and waits until it listens."""
        if b.server and b.server.poll() is None:
            raise TestbedError(f"the server of {b.role} is running already")
        log = self.workdir / f"{b.role}.log"
        b.server = server.start(b, self.vips(), log)
        server.wait_ready(b, log)

    def close(self) -> None:
        """Stops the servers and `l4lb run` by pid, deletes the namespaces (their
        veths, and so the XDP attachments, go with them), the pinned maps and
        the temp dir. Every step runs even if an earlier one fails."""
        problems = []

        def step(what, fn, *args):
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001  teardown must go on
                problems.append(f"{what}: {e}")

        for b in self.backends:
            if b.server:
                step(f"stop server of {b.role}", stop_popen, b.server)
        if self.lb and self.lb.proc:
            step("stop l4lb run", self.lb.stop)
        for n in self.nodes:
            # anything else still in our namespaces was started by this testbed
            step(f"processes in {n.ns}", stop_pids, ns_pids(n.ns))
        step("close the namespaces' sockets and threads", self._nodes.close)
        for n in self.nodes:
            step(f"delete {n.ns}", remove_ns, n.ns)
        self.nodes = []
        if self.lb:
            step("remove pinned maps", bpf.remove_pins, str(self.lb.pin_dir))
        if self.workdir:
            step("remove temp dir", shutil.rmtree, self.workdir, True)
            self.workdir = None
        for prog in [b.program for b in self.backends if b.program] + [self.router_program]:
            if prog is not None:
                give_back(prog)
        for b in self.backends:
            b.program = None
        self.router_program = None
        if problems:
            log.warning("testbed teardown: %s", "; ".join(problems))

    # -- building blocks
    def _sysctls(self) -> None:
        common = {"net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0,
                  "net.ipv6.conf.all.accept_ra": 0, "net.ipv6.conf.default.accept_ra": 0}
        no_rpf = {"net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0}
        hosts = {"net.ipv4.ip_forward": 0, "net.ipv6.conf.all.forwarding": 0}
        for n in self.nodes:
            if n is self.router:
                n.sysctl({**common, **no_rpf, "net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1})
            elif isinstance(n, Backend):
                n.sysctl({**common, **no_rpf, **hosts,
                          "net.ipv4.conf.all.arp_ignore": 1, "net.ipv4.conf.all.arp_announce": 2})
            else:
                n.sysctl({**common, **hosts})

    def _veth(self, node: Node, ifname: str, peer: Node, peer_ifname: str) -> None:
        """A veth pair with 2 queues a side: node's end ifname, peer's end peer_ifname."""
        fd = os.open(NETNS_DIR / peer.ns, os.O_RDONLY)
        try:
            node.ipr.link("add", ifname=ifname, kind="veth", num_tx_queues=2, num_rx_queues=2, mtu=MTU,
                          peer={"ifname": peer_ifname, "net_ns_fd": fd, "num_tx_queues": 2,
                                "num_rx_queues": 2, "mtu": MTU})
        finally:
            os.close(fd)

    @staticmethod
    def _addrs(node: Node, ifname: str, addrs: list[tuple[str, int]]) -> None:
        idx = node.index(ifname)
        for a, plen in addrs:
            node.ipr.addr("add", index=idx, address=a, prefixlen=plen)
        node.ipr.link("set", index=idx, state="up")

    @staticmethod
    def _routes(node: Node, routes: list[tuple[str, str]]) -> None:
        for dst, gw in routes:
            fam = socket.AF_INET6 if ":" in gw else socket.AF_INET
            node.ipr.route("add", dst=dst, gateway=gw, family=fam)

    def _lb_link(self) -> None:
        r, lb = self.router, self.lb
        self._veth(r, "lb", lb, lb.ifname)
        self._queue(r, "lb")
        self._addrs(r, "lb", [(f"{NET4['lb']}.1", 24), (f"{NET6['lb']}::1", 64)])
        self._addrs(lb, lb.ifname, [(lb.addr4, 24), (lb.addr6, 64)])
        self._addrs(lb, "lo", [])
        self._routes(lb, [("0.0.0.0/0", f"{NET4['lb']}.1"), ("::/0", f"{NET6['lb']}::1")])
        self._routes(r, [(VIP_NET4, lb.addr4), (VIP_NET6, lb.addr6),
                         (ENCAP_NET4, lb.addr4), (ENCAP_NET6, lb.addr6)])
        self.gateway_mac = r.ipr.link("get", index=r.index("lb"))[0].get_attr("IFLA_ADDRESS")
        lb.config.write_text(
            "# written by l4lb.testbed: the router is the gateway\n"
            f'gateway_mac: "{self.gateway_mac}"\n'
            f'encap_source: {{ipv4: {ENCAP_NET4}, ipv6: "{ENCAP_NET6}"}}\n'
            f"mtu: {MTU}\n")

    def _bridges(self) -> None:
        r = self.router
        for br, net in (("brc", "clients"), ("brb", "backends")):
            r.ipr.link("add", ifname=br, kind="bridge", br_stp_state=0, br_forward_delay=0,
                       br_mcast_snooping=0)
            self._addrs(r, br, [(f"{NET4[net]}.{ROUTER_HOST}", 24), (f"{NET6[net]}::{ROUTER_HOST:x}", 64)])
        self._addrs(r, "lo", [])

    def _attach_port(self, port: str, bridge: str) -> None:
        r = self.router
        r.ipr.link("set", index=r.index(port), master=r.index(bridge), state="up")

    def _client(self, c: Client) -> None:
        self._veth(self.router, c.role, c, "eth0")
        self._attach_port(c.role, "brc")
        self._addrs(c, "eth0", [(c.addr4, 24), (c.addr6, 64)])
        self._addrs(c, "lo", [])
        self._routes(c, [("0.0.0.0/0", f"{NET4['clients']}.{ROUTER_HOST}"),
                         ("::/0", f"{NET6['clients']}::{ROUTER_HOST:x}")])
        r = subprocess.run(c.nsenter() + ["ethtool", "-K", "eth0", "tx", "off"], capture_output=True, text=True)
        if r.returncode:
            raise TestbedError(f"ethtool -K eth0 tx off in {c.ns}: {r.stderr.strip()}")

    def vips(self) -> list[str]:
        return [self.vip4(i) for i in range(self.opts.vips)] + [self.vip6(i) for i in range(self.opts.vips)]

    @staticmethod
    def _queue(node: Node, ifname: str) -> None:
        """A pfifo qdisc on node's end of a link whose other end runs XDP. A NIC
        queues in front of its TX ring; a veth has no queue (noqueue) and drops
        what the XDP side's 256-frame ring cannot take at once: a TCP burst,
        thousands of retransmits per iperf3 run. With a qdisc, veth stops the
        queue while the peer's ring is full (kernel 6.17+): backpressure, as a
        NIC. QUEUE_PACKETS deep (module docstring)."""
        q = subprocess.run(node.nsenter() + ["tc", "qdisc", "replace", "dev", ifname, "root", "pfifo", "limit",
                                             str(QUEUE_PACKETS)],
                           capture_output=True, text=True)
        if q.returncode:
            raise TestbedError(f"tc qdisc replace dev {ifname} root pfifo in {node.ns}: {q.stderr.strip()}")

    def lb_napi_threaded(self, on: bool) -> None:
        """Whether the LB's veth runs its NAPI (and so the balancer) in a
        kernel thread of its own (the default, see the module's notes) or in
        the sending CPU's softirq (frame generators that outrun a thread:
        bench.traffic's live frames)."""
        self.lb.napi_threaded(self.lb.ifname, on, realtime=True)

    def _backend(self, b: Backend) -> None:
        self._veth(self.router, b.role, b, "eth0")
        self._queue(self.router, b.role)
        self._attach_port(b.role, "brb")
        self._addrs(b, "eth0", [(b.addr4, 24), (b.addr6, 64)])
        self._addrs(b, "lo", [(a, 32 if "." in a else 128) for a in self.vips()])
        self._routes(b, [("0.0.0.0/0", f"{NET4['backends']}.{ROUTER_HOST}"),
                         ("::/0", f"{NET6['backends']}::{ROUTER_HOST:x}")])
        b.sysctl({"net.ipv4.conf.eth0.rp_filter": 0, "net.ipv4.conf.lo.rp_filter": 0})

    def _wait_links(self) -> None:
        """Polls until every veth and bridge is operationally up."""
        want = {self.router: ["lb", "brc", "brb"] + [n.role for n in self.clients + self.backends],
                self.lb: [self.lb.ifname]}
        for n in self.clients + self.backends:
            want[n] = ["eth0"]
        deadline = time.monotonic() + TIMEOUT
        for node, names in want.items():
            for name in names:
                while True:
                    state = node.ipr.link("get", index=node.index(name))[0].get_attr("IFLA_OPERSTATE")
                    if state == "UP":
                        break
                    if time.monotonic() > deadline:
                        raise TestbedError(f"{node.role}: {name} is {state}, not UP, after {TIMEOUT:.0f} s")
                    time.sleep(0.02)

    def _wait_routes(self) -> None:
        """Polls until each client reaches each backend's own addresses (not a
        VIP: the LB is not involved) over IPv4 and IPv6: routing, neighbours
        and the servers all work."""
        deadline = time.monotonic() + TIMEOUT
        for c in self.clients:
            for b in self.backends:
                for a in (b.addr4, b.addr6):
                    while True:
                        try:
                            conn = c.connect(a, timeout=1.0)
                            try:
                                name = conn.ask("ready?")
                            finally:
                                conn.close()
                            if name != b.role:
                                raise TestbedError(f"{a} answered as {name}, expected {b.role}")
                            break
                        except TestbedError:
                            if time.monotonic() > deadline:
                                raise
                            time.sleep(0.05)

    # -- helpers for tests and the demo
    def decap_totals(self) -> dict[str, int]:
        tot = {"decap4": 0, "decap6": 0}
        for b in self.backends:
            for k, v in b.decap_counts().items():
                tot[k] += v
        return tot

    def client_segments(self) -> int:
        """TCP segments the clients have sent, retransmissions included."""
        total = 0
        for c in self.clients:
            s = c.snmp()
            total += s["Tcp.OutSegs"] + s["Tcp.RetransSegs"]
        return total

    def csum_errors(self) -> dict[str, int]:
        """Checksum errors counted by each backend's stack (TCP, UDP, UDP6)."""
        out = {}
        for b in self.backends:
            s = b.snmp()
            out[b.role] = s["Tcp.InCsumErrors"] + s["Udp.InCsumErrors"] + s.get("Udp6InCsumErrors", 0)
        return out
