"""The fleet testbed: N LB nodes (default 3) behind a router that runs BIRD 2,
each node announcing the VIPs over BGP (+ BFD) from a BIRD of its own, the
router spreading flows over the nodes by ECMP with L4 hashing.

    c1 ─┐                  ┌─ lb1 (l4lb run --announce, bird)    ┌─ b1
        ├─ brc ─ router ───┼─ lb2                          brb ──┼─ b2
    c2 ─┘     (bird, ECMP) └─ lb3                                └─ b3

* Router <-> LB node k: a veth on 198.18.1.(4k)/30 (router .4k+1, node
  .4k+2) and fd00:198:18:1:k::/80 (router ::1, node ::2; /80, not /64: k is
  the fifth group, so as /64s every link would be the same prefix
  fd00:198:18:1::/64 and the router could not tell its links apart). The router is AS
  64512, every LB node AS 64513; one IPv4 and one IPv6 eBGP session per node,
  each with BFD (100 ms x 3).
* Each node runs `l4lb run --announce` on an interface named
  l4lbtb<tag>-<k> (so its pinned maps, lock and state do not collide with the
  other nodes') and a BIRD configured by l4lb.announce.bird_config() (what
  `l4lb bird-config` prints). Every BIRD has its config, control socket, pid
  file and log in the testbed's temp dir, and runs in the foreground as a
  child of this process: the system's own bird service plays no part.
* The router's BIRD imports the sessions and exports them to its kernel with
  `merge paths on`: one multipath route per VIP, over every node that
  announces it; fib_multipath_hash_policy=1 (IPv4 and IPv6) hashes the
  5-tuple, so a flow stays on one node while the set of nodes is unchanged.
* Clients, backends, bridges, decapsulation and the backends' servers are
  those of the single-LB Testbed (topology.py)."""
from __future__ import annotations

import ipaddress
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

from ..announce import DEFAULT_TABLE, bird_config
from . import server
from .common import MTU, NET4, NET6, PREFIX, SERVICE_PORT, TIMEOUT, TestbedError, wait_until
from .hosts import Backend, Client
from .lbproc import Lb, LbLauncher
from .namespaces import Node, create_ns, remove_ns, stop_popen, sweep
from .topology import Testbed
from .tunnels import decapsulate, give_back, resolve_decap, take_decap

ROUTER_AS, LB_AS = 64512, 64513
BFD_MS, BFD_MULT = 100, 3
MAX_NODES = 9  # interface names: l4lbtb + tag + -k fits IFNAMSIZ for one digit


def link4(k: int) -> tuple[str, str]:
    """(router, node) IPv4 addresses on the link to LB node k (a /30)."""
    return f"{NET4['lb']}.{4 * k + 1}", f"{NET4['lb']}.{4 * k + 2}"


def link6(k: int) -> tuple[str, str]:
    return f"{NET6['lb']}:{k:x}::1", f"{NET6['lb']}:{k:x}::2"


class Bird:
    """One BIRD 2 in a namespace: its own config, control socket, pid file and
    log under `workdir`; started in the foreground (-f), stopped by pid."""

    def __init__(self, node: Node, name: str, workdir: Path):
        self.node = node
        self.name = name
        self.config = workdir / f"bird-{name}.conf"
        self.ctl = workdir / f"bird-{name}.ctl"
        self.pidfile = workdir / f"bird-{name}.pid"
        self.log = workdir / f"bird-{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.proc and self.proc.poll() is None:
            raise TestbedError(f"bird {self.name} runs already")
        check = subprocess.run(["bird", "-p", "-c", str(self.config)], capture_output=True, text=True)
        if check.returncode:
            raise TestbedError(f"bird {self.name}: its configuration does not parse: {check.stderr.strip()}")
        with open(self.log, "a") as logf:
            self.proc = subprocess.Popen(self.node.nsenter() + ["bird", "-f", "-c", str(self.config), "-s",
                                         str(self.ctl), "-P", str(self.pidfile)],
                                         stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def kill(self) -> None:
        """SIGKILL: no BGP notification, the peer learns it from BFD."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc:
            stop_popen(self.proc)

    def cli(self, *command: str) -> str:
        r = subprocess.run(["birdc", "-s", str(self.ctl), *command], capture_output=True, text=True, timeout=10)
        if r.returncode:
            raise TestbedError(f"birdc {' '.join(command)} ({self.name}): {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout

    def established(self) -> set[str]:
        """Names of the BGP protocols whose session is Established."""
        try:
            text = self.cli("show", "protocols")
        except (TestbedError, subprocess.TimeoutExpired):
            return set()
        return {line.split()[0] for line in text.splitlines()
                if " BGP " in line and "Established" in line}


class Fleet(Testbed):
    """The topology of the module docstring, built on __enter__ and removed on
    __exit__. `lbs[k-1]` is LB node k (an Lb, with .bird); `lb` is node 1."""

    __test__ = False

    def __init__(self, nodes: int = 3, decap: str = "auto", clients: int = 2, backends: int = 3, vips: int = 16,
                 progress: Callable[[str], None] | None = None, lb_args: list[str] | None = None,
                 announce_table: int = DEFAULT_TABLE, *, launcher: LbLauncher):
        if not 1 <= nodes <= MAX_NODES:
            raise TestbedError(f"a fleet has 1 to {MAX_NODES} LB nodes, not {nodes}")
        super().__init__(decap, clients, backends, vips, progress, lb_args, launcher=launcher)
        self.n = nodes
        self.table = announce_table
        self.lbs: list[Lb] = []
        self.router_bird: Bird | None = None
        self.router_programs: list = []

    def node_ifname(self, k: int) -> str:
        return f"{PREFIX}{self.tag}-{k}"

    def build(self) -> None:
        t0 = time.monotonic()
        if not (shutil.which("bird") and shutil.which("birdc")):
            raise TestbedError("bird and birdc (Debian's bird2) are not installed: run `make setup`")
        sweep(self.say)
        self.decap = resolve_decap(self.opts.decap)

        self.workdir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-{self.tag}-"))
        self.say(f"namespaces {self.ns_name('*')}: a router, {self.n} LB nodes (decapsulation: {self.decap})")
        roles = ["router"] + [f"lb{k}" for k in range(1, self.n + 1)] + \
            [f"c{i + 1}" for i in range(self.opts.clients)] + [f"b{i + 1}" for i in range(self.opts.backends)]
        for role in roles:
            remove_ns(self.ns_name(role))
            create_ns(self.ns_name(role))
            if role == "router":
                node = self.router = Node(role, self.ns_name(role))
            elif role.startswith("lb"):
                k = int(role[2:])
                wd = self.workdir / role
                wd.mkdir()
                node = Lb(role, self.ns_name(role), self.node_ifname(k), wd, self.launcher)
                node.addr4, node.addr6 = link4(k)[1], link6(k)[1]
                node.k = k
                node.run_args = list(self.opts.lb_args) + ["--announce", str(self.table)]
                self.lbs.append(node)
            elif role.startswith("c"):
                node = Client(role, self.ns_name(role), int(role[1:]))
                self.clients.append(node)
            else:
                node = Backend(role, self.ns_name(role), int(role[1:]))
                self.backends.append(node)
            self.nodes.append(self._nodes.enter_context(node))
        self.lb = self.lbs[0]
        self._sysctls()
        # keep_addr_on_down: a link taken down and up again (a node cut off, then back)
        # keeps its IPv6 addresses, as IPv4 ones are kept, so its BGP session can return
        self.router.sysctl({"net.ipv4.fib_multipath_hash_policy": 1, "net.ipv6.fib_multipath_hash_policy": 1,
                            "net.ipv6.conf.all.keep_addr_on_down": 1})
        for lb in self.lbs:
            lb.sysctl({"net.ipv6.conf.all.keep_addr_on_down": 1})

        self.say(f"links to the {self.n} LB nodes and `l4lb run --announce {self.table}` on each")
        for lb in self.lbs:
            self._node_link(lb)
            lb.start(with_config=True)
        self.say("bridges, clients, backends")
        self._bridges()
        for c in self.clients:
            self._client(c)
        for b in self.backends:
            self._backend(b)
        for b in self.backends:
            b.server = server.start(b, self.vips(), self.workdir / f"{b.role}.log")
        for b in self.backends:
            decapsulate(b, self.decap)
        self.say("XDP on the router's ends of the LB links (makes XDP_TX from the LB nodes deliverable)")
        for lb in self.lbs:
            prog = take_decap()
            self.router_programs.append(prog)
            self.router.run(prog.attach, f"n{lb.k}", "native")

        self.say("BIRD 2 on the router and on each LB node (BGP + BFD)")
        self.router_bird = Bird(self.router, "router", self.workdir)
        self.router_bird.config.write_text(self.router_bird_config())
        self.router_bird.start()
        for lb in self.lbs:
            lb.bird = Bird(lb, lb.role, lb.workdir)
            r4, _ = link4(lb.k)
            r6, _ = link6(lb.k)
            lb.bird.config.write_text(bird_config(link4(lb.k)[1], LB_AS, [(r4, ROUTER_AS), (r6, ROUTER_AS)],
                                                  self.table, bfd_interval_ms=BFD_MS, bfd_multiplier=BFD_MULT))
            lb.bird.start()

        self._wait_links()
        for b in self.backends:
            server.wait_ready(b, self.workdir / f"{b.role}.log")
        self._wait_routes()
        self.say("waiting for every `l4lb run` to serve gRPC and every BGP session to come up")
        for lb in self.lbs:
            lb.wait_healthy()
        self.wait_sessions()
        for b in self.backends:
            b.zero_decap_counts()
        self.build_seconds = time.monotonic() - t0
        self.say(f"fleet ready in {self.build_seconds:.1f} s")

    def router_bird_config(self) -> str:
        lines = [f"router id {link4(1)[0]};", "protocol device { scan time 10; }", ""]
        for fam in ("ipv4", "ipv6"):
            lines += ["protocol kernel {", "  merge paths on;   # ECMP: one multipath route over every node",
                      f"  {fam} {{ import none; export all; }};", "}", ""]
        lines += ["protocol bfd {", '  interface "*" {', f"    min rx interval {BFD_MS} ms;",
                  f"    min tx interval {BFD_MS} ms;", f"    multiplier {BFD_MULT};", "  };", "}", ""]
        for lb in self.lbs:
            for fam, (mine, peer) in (("ipv4", link4(lb.k)), ("ipv6", link6(lb.k))):
                lines += [f"protocol bgp {lb.role}_{fam[-1]} {{", f"  local {mine} as {ROUTER_AS};",
                          f"  neighbor {peer} as {LB_AS};", "  hold time 9;", "  connect retry time 1;",
                          "  error wait time 1, 10;", "  bfd on;",
                          f"  {fam} {{ import all; export none; }};", "}", ""]
        return "\n".join(lines)

    def _node_link(self, lb: Lb) -> None:
        r = self.router
        port = f"n{lb.k}"
        self._veth(r, port, lb, lb.ifname)
        r4, n4 = link4(lb.k)
        r6, n6 = link6(lb.k)
        self._addrs(r, port, [(r4, 30), (r6, 80)])
        self._addrs(lb, lb.ifname, [(n4, 30), (n6, 80)])
        self._addrs(lb, "lo", [])
        self._routes(lb, [("0.0.0.0/0", r4), ("::/0", r6)])
        mac = r.ipr.link("get", index=r.index(port))[0].get_attr("IFLA_ADDRESS")
        (lb.workdir / "lb.yaml").write_text(
            "# written by l4lb.testbed.fleet: the router is the gateway\n"
            f'gateway_mac: "{mac}"\n'
            f"mtu: {MTU}\n")

    def _wait_links(self) -> None:
        want = {self.router: ["brc", "brb"] + [f"n{lb.k}" for lb in self.lbs] +
                [n.role for n in self.clients + self.backends]}
        for lb in self.lbs:
            want[lb] = [lb.ifname]
        for n in self.clients + self.backends:
            want[n] = ["eth0"]
        for node, names in want.items():
            for name in names:
                wait_until(lambda node=node, name=name: node.ipr.link("get", index=node.index(name))[0]
                           .get_attr("IFLA_OPERSTATE") == "UP", TIMEOUT, f"{node.role}: {name} up")

    def wait_sessions(self, timeout: float = 30.0) -> None:
        """Until the router has every session (IPv4 and IPv6 to each node) Established."""
        want = {f"{lb.role}_{f}" for lb in self.lbs for f in "46"}
        try:
            wait_until(lambda: want <= self.router_bird.established(), timeout,
                       f"BGP sessions {sorted(want)} established on the router")
        except TestbedError as e:
            try:
                shown = self.router_bird.cli("show", "protocols")
            except (TestbedError, subprocess.TimeoutExpired) as why:
                shown = str(why)
            raise TestbedError(f"{e}; the router's BIRD says:\n{shown}\nlog: "
                               f"{self.router_bird.log.read_text(errors='replace')[-2000:]}") from None

    # -- what the router learned
    def router_nexthops(self, vip: str) -> set[str]:
        """The LB node addresses the router's main table sends `vip` to (one
        for a single path, several for a multipath route; empty: no route)."""
        fam = socket.AF_INET6 if ":" in vip else socket.AF_INET
        plen = 128 if fam == socket.AF_INET6 else 32
        out = set()
        for r in self.router.ipr.get_routes(family=fam, table=254):
            if r["dst_len"] != plen or r.get_attr("RTA_DST") is None:
                continue
            if ipaddress.ip_address(r.get_attr("RTA_DST")) != ipaddress.ip_address(vip):
                continue
            gw = r.get_attr("RTA_GATEWAY")
            if gw:
                out.add(str(ipaddress.ip_address(gw)))
            for hop in r.get_attr("RTA_MULTIPATH") or []:
                g = hop.get_attr("RTA_GATEWAY")
                if g:
                    out.add(str(ipaddress.ip_address(g)))
        return out

    def node_by_address(self, address: str) -> Lb:
        a = ipaddress.ip_address(address)
        for lb in self.lbs:
            if a in (ipaddress.ip_address(lb.addr4), ipaddress.ip_address(lb.addr6)):
                return lb
        raise KeyError(address)

    def wait_nexthops(self, vip: str, nodes: list[Lb], timeout: float = 15.0) -> float:
        """Polls until the router sends vip to exactly `nodes`; returns the seconds it took."""
        fam6 = ":" in vip
        want = {(lb.addr6 if fam6 else lb.addr4) for lb in nodes}
        want = {str(ipaddress.ip_address(a)) for a in want}
        t0 = time.monotonic()
        wait_until(lambda: self.router_nexthops(vip) == want, timeout,
                   f"the router's route to {vip} over {sorted(want) or 'no node'} "
                   f"(has {sorted(self.router_nexthops(vip))})", interval=0.01)
        return time.monotonic() - t0

    def config_yaml(self, backends: int | None = None, vips: int = 1) -> str:
        """One TCP and one UDP VIP per family and VIP number, on the first
        `backends` backends (all by default), as `l4lb apply -f` reads it."""
        bs = self.backends[:backends] if backends else self.backends
        lines = ["vips:"]
        for i in range(vips):
            for addr, fam in ((self.vip4(i), "addr4"), (self.vip6(i), "addr6")):
                for proto in ("tcp", "udp"):
                    lines += [f'  - address: "{addr}"', f"    port: {SERVICE_PORT}", f"    protocol: {proto}",
                              "    backends:"]
                    lines += [f'      - address: "{getattr(b, fam)}"' for b in bs]
        return "\n".join(lines) + "\n"

    # -- breaking and mending nodes
    def kill_node(self, lb: Lb) -> None:
        """The node dies without a word: its BIRD freezes (SIGSTOP: no BGP
        notification, no TCP reset, no BFD packets any more) and its data
        plane stops (the program detached: packets reach a stack that does
        not forward). Only BFD tells the router."""
        lb.bird.proc.send_signal(signal.SIGSTOP)
        lb.detach()

    def revive_node(self, lb: Lb) -> None:
        """The node comes back: `l4lb run` restarted (it attaches the program
        again on the pinned maps, connection table included), then its BIRD."""
        lb.bird.kill()
        lb.restart()
        lb.bird.start()

    def set_link(self, lb: Lb, up: bool) -> None:
        """The router's end of the link to lb, up or down (a node cut off)."""
        r = self.router
        r.ipr.link("set", index=r.index(f"n{lb.k}"), state="up" if up else "down")

    def close(self) -> None:
        for lb in self.lbs:
            bird = getattr(lb, "bird", None)
            if bird:
                try:
                    bird.stop()
                except Exception:  # noqa: BLE001  teardown goes on
                    pass
        if self.router_bird:
            try:
                self.router_bird.stop()
            except Exception:  # noqa: BLE001
                pass
        running = [lb for lb in self.lbs if lb.proc]
        self.lb = None  # the base class stops only its one LB: stop every node here
        for lb in running:
            try:
                lb.stop()
            except Exception:  # noqa: BLE001
                pass
        pins = [lb.pin_dir for lb in self.lbs]
        super().close()
        from .. import bpf  # noqa: PLC0415

        for p in pins:
            try:
                bpf.remove_pins(str(p))
            except Exception:  # noqa: BLE001
                pass
        for prog in self.router_programs:
            give_back(prog)
        self.router_programs = []
        self.lbs = []
