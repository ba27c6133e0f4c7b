"""Helpers of the end-to-end tests: the LB driven through its gRPC API,
counters read before and after, Maglev predictions, and the binomial bounds
that decide whether a spread of connections matches the weights."""
from __future__ import annotations

import contextlib
import ipaddress
import math
import time
from collections import Counter
from functools import lru_cache

import grpc

from control.client import Client
from control.l4lb.v1 import l4lb_pb2 as pb
from l4lb import consts
from l4lb.flowhash import flow_hash, ring_slot
from l4lb.maglev import maglev_table
from l4lb.testbed import Conn, Testbed, TestbedError

def wait_for(cond, timeout: float, what: str) -> None:
    """Polls cond() every 50 ms until it is true; fails naming `what` after timeout s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# The spread tests accept a count when a correct balancer would produce one at
# least this far from its mean with probability ALPHA or more (over all the
# backends of a test together): a correct balancer fails them once in 1000 runs.
ALPHA = 0.001


def binomial_bounds(n: int, p: float, alpha: float) -> tuple[int, int]:
    """The two-sided acceptance interval [lo, hi] of X ~ Binomial(n, p) at
    significance alpha: lo is the largest k with P(X < k) <= alpha/2 and hi the
    smallest k with P(X > k) <= alpha/2. Exact tails, from math.comb."""
    pmf = [math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(n + 1)]
    lo, below = 0, 0.0
    while lo < n and below + pmf[lo] <= alpha / 2:
        below += pmf[lo]
        lo += 1
    hi, above = n, 0.0
    while hi > 0 and above + pmf[hi] <= alpha / 2:
        above += pmf[hi]
        hi -= 1
    return lo, hi


def vip_id(address: str, port: int = 80, protocol: str = "tcp") -> pb.VipId:
    return pb.VipId(address=address, port=port, protocol=protocol)


def canonical(address: str) -> str:
    return str(ipaddress.ip_address(address))


@lru_cache(maxsize=32)
def _table(backends: tuple[tuple[str, int], ...], ring_size: int) -> list:
    return maglev_table(dict(backends), ring_size)


class Lb:
    """The LB's gRPC API with what the tests need of it."""

    def __init__(self, bed: Testbed):
        self.bed = bed
        self.client = Client(bed.lb.grpc_address)
        self.ring_size = self.call("GetStatus", pb.GetStatusRequest()).capacity.ring_size

    def call(self, rpc: str, request):
        return self.client.call(rpc, request)

    def reconnect(self) -> None:
        """A new channel (after a restart of `l4lb run`)."""
        self.client.close()
        self.client = Client(self.bed.lb.grpc_address)

    def close(self) -> None:
        self.client.close()

    @contextlib.contextmanager
    def vip(self, address: str, backends: dict[str, int], port: int = 80, protocol: str = "tcp", flags=(),
            encap: str = ""):
        vid = vip_id(address, port, protocol)
        self.call("AddVip", pb.AddVipRequest(id=vid, flags=list(flags), encap=encap, backends=[
            pb.Backend(address=a, weight=w) for a, w in backends.items()]))
        try:
            yield vid
        finally:
            with contextlib.suppress(grpc.RpcError):
                self.call("DeleteVip", pb.DeleteVipRequest(id=vid))

    def backends(self, vid: pb.VipId) -> dict[str, int]:
        return {canonical(b.address): b.weight for b in self.call("GetVip", pb.GetVipRequest(id=vid)).backends}

    def counters(self) -> dict[str, int]:
        return dict(self.call("GetStats", pb.GetStatsRequest()).counters)

    def vip_packets(self, vid: pb.VipId) -> int:
        return self.call("GetVip", pb.GetVipRequest(id=vid)).packets

    def lookup(self, src: str, dst: str, sport: int, dport: int, protocol: str = "tcp") -> str:
        """The backend the live program has for a flow (a TCP lookup reads the
        connection table and never writes it; it does move the counters)."""
        r = self.call("LookupFlow", pb.LookupFlowRequest(src=src, dst=dst, sport=sport, dport=dport,
                                                         protocol=protocol))
        return canonical(r.backend) if r.backend else r.verdict

    def table_shares(self, backends: dict[str, int]) -> dict[str, float]:
        """Each backend's share of the VIP's Maglev table: the probability that a
        new flow with a uniformly random hash goes to it."""
        table = _table(tuple(sorted(backends.items())), self.ring_size)
        counts = Counter(table)
        return {a: counts[canonical(a)] / len(table) for a in backends}

    def predict(self, vid: pb.VipId, src: str, sport: int, backends: dict[str, int] | None = None) -> str | None:
        """The backend Maglev gives a new flow, computed here from the weights."""
        backends = self.backends(vid) if backends is None else backends
        table = _table(tuple(sorted(backends.items())), self.ring_size)
        proto = consts.PROTOCOLS[vid.protocol]
        return table[ring_slot(flow_hash(src, vid.address, sport, vid.port, proto), self.ring_size)]


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


def settle(read, timeout: float = 5.0, interval: float = 0.05):
    """Polls read() until two reads in a row agree (the last packets of closed
    connections have arrived); returns the value."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = read()
        if now == last:
            return now
        last = now
    raise TestbedError(f"counters still moving after {timeout} s: {last}")


def open_many(bed: Testbed, address: str, n: int, text: str = "hello") -> list[Conn]:
    """n connections to address, alternating clients, each answered once."""
    conns = []
    for i in range(n):
        c = bed.clients[i % len(bed.clients)].connect(address)
        c.ask(text)
        conns.append(c)
    return conns


def by_backend(conns: list[Conn]) -> Counter:
    return Counter(c.backend for c in conns)


def close_all(conns) -> None:
    for c in conns:
        c.close()
