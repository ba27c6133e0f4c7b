"""`l4lb demo --fleet [N]`: a fleet of N LB nodes (default 3) behind a router
that runs BIRD 2 (l4lb/testbed/fleet.py). One configuration goes to every
node; the router learns each VIP from every node over BGP and spreads flows
over them by ECMP; every connection is answered by the backend that every
node's table names for it, whichever node carried it; then, while long-lived
TCP connections and numbered UDP streams run, one node is drained, one dies
without a word (BFD tells the router) and comes back. Exits non-zero if a
connection broke or a count disagrees."""
from __future__ import annotations

import ipaddress
import time
from collections import Counter

from rich.markup import escape
from rich.table import Table

from l4lb.testbed import SERVICE_PORT, Fleet, Traffic

from .client import Client
from .demo import Demo, Failed
from .launcher import launcher
from .l4lb.v1 import l4lb_pb2 as pb


def _canonical(a: str) -> str:
    return str(ipaddress.ip_address(a))


class FleetDemo(Demo):
    def __init__(self, decap: str, connections: int, nodes: int):
        super().__init__(decap, connections)
        self.n_nodes = nodes

    def run(self) -> int:
        t0 = time.monotonic()
        fleet = None
        self.apis: list[Client] = []
        try:
            with self.step(f"build a fleet of {self.n_nodes} LB nodes behind a BIRD router"):
                with self.out.status("building") as status:
                    fleet = Fleet(nodes=self.n_nodes, decap=self.decap, progress=lambda m: status.update(m),
                                  launcher=launcher())
                    fleet.__enter__()
                self.fleet = fleet
                self.out.print(f"  {len(fleet.clients)} clients, a router (BIRD 2, AS 64512), {fleet.n} LB nodes "
                               f"(BIRD 2, AS 64513, BGP + BFD), {len(fleet.backends)} backends "
                               f"(namespaces {fleet.ns_name('*')})")
            self.apis = [Client(lb.grpc_address) for lb in fleet.lbs]
            self.configure_all()
            self.spread()
            self.failures_under_traffic()
        except Failed as e:
            self.failures.append(str(e))
        except KeyboardInterrupt:
            self.failures.append("interrupted")
        finally:
            for a in self.apis:
                a.close()
            if fleet is not None:
                self.tear_down(fleet, "namespaces, BIRDs, l4lb runs, pinned maps")
        return self.verdict("fleet demo", t0)

    def configure_all(self) -> None:
        f = self.fleet
        with self.step("one configuration to every node (Apply), announced over BGP"):
            text = f.config_yaml()
            for lb, api in zip(f.lbs, self.apis):
                r = api.call("Apply", pb.ApplyRequest(config_yaml=text))
                self.out.print(f"  {lb.role}: {len(r.changes)} changes applied")
            for vip in (f.vip4(0), f.vip6(0)):
                took = f.wait_nexthops(vip, f.lbs)
                hops = ", ".join(f.node_by_address(h).role for h in sorted(f.router_nexthops(vip)))
                self.out.print(f"  router: {vip} -> multipath over {hops} (after {took * 1000:.0f} ms)")
            digests = [[(d.id.address, d.id.protocol, d.ring, d.backends) for d in api.call(
                "GetStatus", pb.GetStatusRequest()).digests] for api in self.apis]
            self.check(all(d == digests[0] for d in digests), f"every node holds the same {len(digests[0])} tables "
                                                              "(GetStatus digests)")

    def spread(self) -> None:
        f = self.fleet
        with self.step(f"open {self.n} TCP connections to each VIP: which node carried each, which backend answered"):
            conns = []
            for vip in (f.vip4(0), f.vip6(0)):
                for i in range(self.n):
                    c = f.clients[i % len(f.clients)].connect(vip)
                    c.ask("hello")
                    conns.append((vip, c))
            carriers = Counter()
            same = 0
            flows = {}
            for lb, api in zip(f.lbs, self.apis):
                for vip in (f.vip4(0), f.vip6(0)):
                    r = api.call("ListFlows", pb.ListFlowsRequest(
                        id=pb.VipId(address=vip, port=SERVICE_PORT, protocol="tcp"), limit=100000))
                    for x in r.flows:
                        flows.setdefault((_canonical(x.src), x.sport), set()).add(lb.role)
            table = Counter()
            for vip, c in conns:
                held = flows.get((_canonical(c.src), c.sport), set())
                node = held.pop() if len(held) == 1 else "?"
                carriers[node] += 1
                table[(node, c.backend)] += 1
                answers = {_canonical(api.call("LookupFlow", pb.LookupFlowRequest(
                    src=c.src, dst=vip, sport=c.sport, dport=SERVICE_PORT, protocol="tcp")).backend)
                    for api in self.apis}
                backend = f.backend(c.backend)
                if answers == {_canonical(backend.addr6 if ":" in vip else backend.addr4)}:
                    same += 1
                c.close()
            t = Table(title="connections per LB node and backend", title_justify="left")
            t.add_column("node")
            for b in f.backends:
                t.add_column(b.role, justify="right")
            t.add_column("total", justify="right")
            for lb in f.lbs:
                t.add_row(lb.role, *[str(table[(lb.role, b.role)]) for b in f.backends], str(carriers[lb.role]))
            self.out.print(t)
            self.check(carriers["?"] == 0, "every connection is in exactly one node's connection table")
            self.check(all(carriers[lb.role] > 0 for lb in f.lbs), "the router spread the connections over every node")
            self.check(same == len(conns), f"for all {len(conns)} connections, LookupFlow on every node names the "
                                           "backend that answered")

    def failures_under_traffic(self) -> None:
        f = self.fleet
        lbs = f.lbs
        victim, drained = lbs[-1], lbs[1 % len(lbs)]
        with self.step(f"long-lived connections while {drained.role} is drained and {victim.role} dies and returns"):
            traffic = Traffic(f)
            traffic.start()
            events = []

            def event(name, action, nodes):
                t0 = time.monotonic()
                action()
                took = max(f.wait_nexthops(v, nodes, timeout=60) for v in (f.vip4(0), f.vip6(0)))
                events.append((name, took))
                self.out.print(f"  {name}: the router converged in {took * 1000:.0f} ms")
                time.sleep(1.0)

            try:
                time.sleep(1.0)
                k = lbs.index(drained)
                event(f"drain {drained.role}", lambda: self.apis[k].call("SetDrain", pb.SetDrainRequest(drained=True)),
                      [x for x in lbs if x is not drained])
                event(f"undrain {drained.role}",
                      lambda: self.apis[k].call("SetDrain", pb.SetDrainRequest(drained=False)), lbs)
                if len(lbs) > 1:
                    event(f"{victim.role} dies (BIRD frozen, program detached; BFD tells the router)",
                          lambda: f.kill_node(victim), lbs[:-1])

                    def back():
                        f.revive_node(victim)
                        self.apis[-1].close()
                        self.apis[-1] = Client(victim.grpc_address)
                    event(f"{victim.role} comes back", back, lbs)
            finally:
                traffic.stop()
            broken = traffic.broken()
            lost = traffic.lost()
            sent = sum(len(u.sent) for u in traffic.udp)
            gap = max(traffic.gaps() or [0.0])
            self.out.print(f"  {len(traffic.tcp)} TCP connections, {sum(t.exchanges for t in traffic.tcp)} exchanges "
                           f"checked both ways; {len(traffic.udp)} UDP streams, {sent} datagrams, {len(lost)} lost; "
                           f"failover window (longest UDP gap) {gap * 1000:.0f} ms")
            self.check(not broken, "no TCP connection broke" + (f" ({broken[0]})" if broken else ""))
            self.check(all(len(u.backends) == 1 for u in traffic.udp), "every UDP stream kept its backend")
            self.check(gap < 2.0, "UDP datagrams were lost only within the failover window")
