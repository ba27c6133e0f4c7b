"""`l4lb demo`: real TCP through the load balancer across network namespaces.

Builds the testbed (l4lb/testbed/), configures an IPv4 and an IPv6 VIP with
three backends through the gRPC API, opens connections from two clients and
puts what the backends answered beside what the LB and the backends counted;
then drains one backend while a connection to it stays open. Tears everything
down and exits non-zero if any step failed or any two counts disagree."""
from __future__ import annotations

import argparse
import time
from collections import Counter
from contextlib import contextmanager

import grpc
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from l4lb.errors import L4lbError
from l4lb.testbed import DECAP_MODES, SERVICE_PORT, Testbed, backend_commands

from .client import Client, vip_text
from .launcher import launcher
from .l4lb.v1 import l4lb_pb2 as pb

EPILOG = """examples:
  l4lb demo                      # decapsulation: ipip devices if the kernel has them, else XDP
  l4lb demo --decap xdp --connections 100
  l4lb demo --fleet              # 3 LB nodes behind a BIRD router (BGP, BFD, ECMP)
  make demo
"""


class Failed(Exception):
    """A step of the demo went wrong; the message says what."""


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="real TCP through the LB in network namespaces, counters checked",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decap", choices=DECAP_MODES, default="auto",
                   help="how backends decapsulate: ipip/ip6tnl devices, the XDP decap program, or auto")
    p.add_argument("--connections", type=int, default=200, help="connections per VIP (default 200)")
    p.add_argument("--fleet", type=int, nargs="?", const=3, metavar="N",
                   help="N LB nodes (default 3) behind a BIRD router: BGP, ECMP, a node drained and killed "
                        "under traffic (README.md, \"Deployment: a fleet of LB nodes\")")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    if not 1 <= args.connections <= 5000:
        raise L4lbError(f"--connections {args.connections}: use 1-5000")
    if args.fleet is not None:
        from l4lb.testbed.fleet import MAX_NODES  # noqa: PLC0415

        from .fleet_demo import FleetDemo  # noqa: PLC0415

        if not 2 <= args.fleet <= MAX_NODES:
            raise L4lbError(f"--fleet {args.fleet}: use 2-{MAX_NODES} LB nodes")
        return FleetDemo(args.decap, args.connections, args.fleet).run()
    return Demo(args.decap, args.connections).run()


class Demo:
    def __init__(self, decap: str, connections: int):
        self.decap = decap
        self.n = connections
        self.out = Console(highlight=False)
        self.failures: list[str] = []

    @contextmanager
    def step(self, title: str):
        t0 = time.monotonic()
        self.out.rule(f"[bold]{escape(title)}", align="left")
        try:
            yield
        except (Failed, L4lbError, grpc.RpcError, OSError) as e:
            msg = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError) else str(e)
            self.out.print(f"[red]✗ {escape(title)}: {escape(msg)}")
            raise Failed(f"{title}: {msg}") from e
        self.out.print(f"[green]✓[/] {escape(title)} ({time.monotonic() - t0:.1f} s)")

    def check(self, ok: bool, what: str) -> None:
        if ok:
            self.out.print(f"  [green]✓[/] {escape(what)}")
        else:
            self.out.print(f"  [red]✗ {escape(what)}")
            self.failures.append(what)

    def run(self) -> int:
        t0 = time.monotonic()
        bed = None
        try:
            with self.step("build the testbed"):
                with self.out.status("building") as status:
                    bed = Testbed(decap=self.decap, progress=lambda m: status.update(m), launcher=launcher())
                    bed.__enter__()
                self.out.print(f"  {len(bed.clients)} clients, a router, the LB, {len(bed.backends)} backends "
                               f"(namespaces {bed.ns_name('*')})")
                self.out.print(f"  balancer: native XDP on {bed.lb.ifname}; decapsulation: {bed.decap}")
                b = bed.backends[0]
                vips = bed.vips()
                cmds = backend_commands(b, bed.decap, [vips[0], vips[len(vips) // 2]])
                self.out.print(f"  each backend prepared for DSR (docs/dsr-backend.md); on {b.role}, as commands "
                               f"(the VIP lines repeat for all {len(vips)} VIP addresses):")
                for cmd in cmds:
                    self.out.print(f"    {escape(cmd)}")
            with Client(bed.lb.grpc_address) as api:
                self.api = api
                self.bed = bed
                vips = self.configure()
                self.traffic(vips)
                self.drain(vips[0])
                self.health(vips[1])
        except Failed as e:
            self.failures.append(str(e))
        except KeyboardInterrupt:
            self.failures.append("interrupted")
        finally:
            if bed is not None:
                self.tear_down(bed, "namespaces, processes, pinned maps")
        return self.verdict("demo", t0)

    def tear_down(self, bed, what: str) -> None:
        with self.out.status("tearing down"):
            t1 = time.monotonic()
            bed.close()
        self.out.print(f"[green]✓[/] tear down: {what} removed ({time.monotonic() - t1:.1f} s)")

    def verdict(self, name: str, t0: float) -> int:
        took = time.monotonic() - t0
        if self.failures:
            self.out.print(f"[red bold]{name} FAILED after {took:.0f} s:[/] " + escape("; ".join(self.failures)))
            return 1
        self.out.print(f"[green bold]{name} passed[/] in {took:.0f} s")
        return 0

    # ---- steps ----------------------------------------------------------------------------
    def configure(self) -> list[pb.VipId]:
        bed = self.bed
        vips = []
        with self.step("configure VIPs through the gRPC API"):
            for address, family in ((bed.vip4(0), "addr4"), (bed.vip6(0), "addr6")):
                vid = pb.VipId(address=address, port=SERVICE_PORT, protocol="tcp")
                self.api.call("AddVip", pb.AddVipRequest(id=vid, backends=[
                    pb.Backend(address=getattr(b, family), weight=1) for b in bed.backends]))
                vips.append(vid)
                self.out.print(f"  {escape(vip_text(vid))}, backends: " +
                               ", ".join(b.role for b in bed.backends))
                self.out.print("    " + ", ".join(getattr(b, family) for b in bed.backends))
            gw = self.api.call("GetGateway", pb.GetGatewayRequest())
            self.out.print(f"  gateway (the router's MAC on the LB link): {gw.mac}")
        return vips

    def _open(self, vid: pb.VipId, n: int, progress: Progress, task) -> list:
        conns = []
        for i in range(n):
            c = self.bed.clients[i % len(self.bed.clients)].connect(vid.address)
            c.ask("hello")
            conns.append(c)
            progress.advance(task)
        return conns

    def _progress(self) -> Progress:
        return Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=self.out, transient=True, disable=not self.out.is_terminal)

    def _stats(self):
        s = self.api.call("GetStats", pb.GetStatsRequest())
        return dict(s.counters), {(v.id.address, v.id.port, v.id.protocol): v.packets for v in s.vips}

    def _settled(self, read, timeout: float = 5.0):
        """Reads until two reads in a row agree: the last ACKs of closed connections are in."""
        deadline = time.monotonic() + timeout
        last = read()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = read()
            if now == last:
                return now
            last = now
        raise Failed(f"counters still moving after {timeout:.0f} s")

    def traffic(self, vips: list[pb.VipId]) -> None:
        bed = self.bed
        with self.step(f"open {self.n} TCP connections to each VIP from {len(bed.clients)} clients"):
            counters0, packets0 = self._stats()
            decap0 = {b.role: b.decap_counts() for b in bed.backends}
            seg0 = bed.client_segments()
            conns = {}
            with self._progress() as progress:
                for vid in vips:
                    task = progress.add_task(vip_text(vid), total=self.n)
                    conns[vid.address] = self._open(vid, self.n, progress, task)
            for cs in conns.values():
                for c in cs:
                    c.close()
            sent = self._settled(bed.client_segments) - seg0
            counters1, packets1 = self._settled(self._stats)
            decap1 = {b.role: b.decap_counts() for b in bed.backends}
            # the LB's connection table, read after the counters (a lookup moves them)
            table = {}
            for vid in vips:
                for c in conns[vid.address]:
                    r = self.api.call("LookupFlow", pb.LookupFlowRequest(
                        src=c.src, dst=vid.address, sport=c.sport, dport=vid.port, protocol="tcp"))
                    table[(c.src, c.sport)] = bed.backend_by_address(r.backend).role if r.backend else r.verdict
            self.out.print(f"  {2 * self.n} connections answered; their entries read back with LookupFlow")

        with self.step("compare the answers with the LB's and the backends' counts"):
            t = Table(title=f"connections per backend (port {SERVICE_PORT}/tcp)", title_justify="left")
            for col in ("backend", "VIP", "answered", "LB table", "decap pkts"):
                t.add_column(col, justify="left" if col in ("backend", "VIP") else "right")
            kinds = {vips[0].address: "decap4", vips[1].address: "decap6"}
            for b in bed.backends:
                for vid in vips:
                    answered = sum(1 for c in conns[vid.address] if c.backend == b.role)
                    in_table = sum(1 for c in conns[vid.address] if table[(c.src, c.sport)] == b.role)
                    d = decap1[b.role][kinds[vid.address]] - decap0[b.role][kinds[vid.address]]
                    t.add_row(b.role, vid.address, str(answered), str(in_table), str(d))
                    self.check_quiet(answered == in_table, f"{b.role} {vip_text(vid)}: {answered} answered, "
                                                           f"{in_table} in the LB's connection table")
            self.out.print(t)
            self.out.print("  answered: what the backend's server said; LB table: the backend in the LB's\n"
                           "  connection table (LookupFlow); decap pkts: packets the backend decapsulated")
            moved = {k: counters1.get(k, 0) - counters0.get(k, 0) for k in counters1}
            vip_pk = sum(packets1.get((v.address, v.port, v.protocol), 0) -
                         packets0.get((v.address, v.port, v.protocol), 0) for v in vips)
            decapped = sum(decap1[r][k] - decap0[r][k] for r in decap1 for k in decap1[r])
            s = Table(title="packets and flows", title_justify="left")
            s.add_column("what")
            s.add_column("count", justify="right")
            rows = [("TCP segments the clients sent", sent), ("LB: packets to the VIPs", vip_pk),
                    ("LB: encapsulated and sent (tx)", moved.get("tx", 0)),
                    ("backends: packets decapsulated", decapped),
                    ("connections opened", 2 * self.n), ("LB: new flows (ct_insert)", moved.get("ct_insert", 0)),
                    ("LB: dropped (no_backend+malformed+error)",
                     sum(moved.get(k, 0) for k in ("no_backend", "malformed", "error")))]
            for what, n in rows:
                s.add_row(what, str(n))
            self.out.print(s)
            self.check(all(table[(c.src, c.sport)] == c.backend for cs in conns.values() for c in cs),
                       "each answer came from the backend the LB's connection table holds")
            self.check(sent == vip_pk == moved.get("tx", 0) == decapped,
                       "clients' segments = LB's VIP packets = LB's tx = backends' decaps")
            self.check(moved.get("ct_insert", 0) == 2 * self.n, "one new flow per connection")
            self.check(rows[-1][1] == 0, "nothing dropped")
            csum = bed.csum_errors()
            self.check(not any(csum.values()), "no TCP/UDP checksum errors on the backends")
            if self.failures:
                raise Failed("the counts disagree")

    def check_quiet(self, ok: bool, what: str) -> None:
        if not ok:
            self.out.print(f"  [red]✗ {escape(what)}")
            self.failures.append(what)

    def drain(self, vid: pb.VipId) -> None:
        bed = self.bed
        victim = bed.backends[1]
        with self.step(f"drain {victim.role} (weight 0) while a connection to it stays open"):
            keep, spare = None, []
            for _ in range(100):
                c = bed.clients[0].connect(vid.address)
                c.ask("hello")
                if c.backend == victim.role:
                    keep = c
                    break
                spare.append(c)
            for c in spare:
                c.close()
            if keep is None:
                raise Failed(f"100 connections and none reached {victim.role}")
            self.out.print(f"  open before the change: {escape(str(keep))} -> {keep.backend}")
            self.api.call("SetBackendWeights", pb.SetBackendWeightsRequest(
                id=vid, backends=[pb.Backend(address=victim.addr4, weight=0)]))
            self.out.print(f"  SetBackendWeights {escape(vip_text(vid))} {victim.addr4}=0")
            n = max(self.n // 2, 1)
            with self._progress() as progress:
                new = self._open(vid, n, progress, progress.add_task("new connections", total=n))
            got = Counter(c.backend for c in new)
            t = Table(title=f"{n} new connections after the drain", title_justify="left")
            t.add_column("backend")
            t.add_column("weight", justify="right")
            t.add_column("new connections", justify="right")
            for b in bed.backends:
                t.add_row(b.role, "0" if b is victim else "1", str(got[b.role]))
            self.out.print(t)
            for c in new:
                c.close()
            answer = keep.ask("still there?")
            self.out.print(f"  the connection opened before the drain answers again: {answer}")
            keep.close()
            self.check(got[victim.role] == 0, f"no new connection went to {victim.role}")
            self.check(answer == victim.role, f"the established connection still reaches {victim.role}")
            if self.failures:
                raise Failed("draining did not behave")

    def _spread(self, vid: pb.VipId, title: str) -> Counter:
        n = max(self.n // 2, 1)
        with self._progress() as progress:
            new = self._open(vid, n, progress, progress.add_task("new connections", total=n))
        got = Counter(c.backend for c in new)
        for c in new:
            c.close()
        v = self.api.call("GetVip", pb.GetVipRequest(id=vid))
        state = {b.address: b for b in v.backends}
        t = Table(title=f"{title}: {n} new connections", title_justify="left")
        for col in ("backend", "health", "weight", "effective", "new connections"):
            t.add_column(col, justify="left" if col in ("backend", "health") else "right")
        for b in self.bed.backends:
            s = state[b.addr6]
            t.add_row(b.role, s.health, str(s.weight), str(s.effective_weight), str(got[b.role]))
        self.out.print(t)
        return got

    def _wait_health(self, vid: pb.VipId, address: str, want: str, timeout: float = 15.0) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            v = self.api.call("GetVip", pb.GetVipRequest(id=vid))
            if all(b.health for b in v.backends) and any(
                    b.address == address and b.health == want for b in v.backends):
                return time.monotonic() - t0
            time.sleep(0.05)
        raise Failed(f"{address} was not {want} within {timeout:.0f} s")

    def health(self, vid: pb.VipId) -> None:
        bed = self.bed
        victim = bed.backends[2]
        check = pb.HealthCheck(kind="tcp", interval=0.5, timeout=0.3, rise=2, fall=2)
        with self.step(f"health check through the tunnel: {victim.role} loses the VIP, then gets it back"):
            self.api.call("SetHealthCheck", pb.SetHealthCheckRequest(id=vid, health=check))
            self.out.print(f"  l4lb health set {escape(vip_text(vid))} --kind tcp --interval 0.5 --timeout 0.3 "
                           "--rise 2 --fall 2   (via tunnel: probes go to the VIP through each backend's tunnel)")
            for b in bed.backends:
                self._wait_health(vid, b.addr6, "up")
            before = self._spread(vid, "every backend up")
            lo = victim.index("lo")
            victim.ipr.addr("del", index=lo, address=vid.address, prefixlen=128)
            self.out.print(f"  on {victim.role}: ip addr del {vid.address}/128 dev lo   (its server still runs)")
            try:
                took = self._wait_health(vid, victim.addr6, "down")
                self.out.print(f"  {victim.role} down after {took:.1f} s (fall 2 x interval 0.5 s + timeout 0.3 s)")
                during = self._spread(vid, f"{victim.role} down")
            finally:
                victim.ipr.addr("add", index=lo, address=vid.address, prefixlen=128)
            self.out.print(f"  on {victim.role}: ip addr add {vid.address}/128 dev lo")
            took = self._wait_health(vid, victim.addr6, "up")
            self.out.print(f"  {victim.role} up again after {took:.1f} s (rise 2 x interval 0.5 s)")
            after = self._spread(vid, f"{victim.role} back")
            self.check(before[victim.role] > 0, f"{victim.role} took new connections while up")
            self.check(during[victim.role] == 0, f"no new connection went to {victim.role} while it was down")
            self.check(after[victim.role] > 0, f"{victim.role} takes new connections again")
            self.api.call("SetHealthCheck", pb.SetHealthCheckRequest(id=vid, health=pb.HealthCheck(kind="none")))
            if self.failures:
                raise Failed("health checks did not behave")
