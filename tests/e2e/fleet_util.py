"""Helpers of the fleet tests: a gRPC client for every node. (The shared
configuration is Fleet.config_yaml, the traffic that runs while nodes leave
and come back l4lb.testbed.Traffic.)"""
from __future__ import annotations

from control.client import Client
from control.l4lb.v1 import l4lb_pb2 as pb
from l4lb.testbed import Fleet


class Nodes:
    """A gRPC client per LB node."""

    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self.clients = [Client(lb.grpc_address) for lb in fleet.lbs]

    def call(self, k: int, rpc: str, req):
        """The call on LB node k (1-based)."""
        return self.clients[k - 1].call(rpc, req)

    def reconnect(self, k: int) -> None:
        """A new channel to node k (after its `l4lb run` restarted)."""
        self.clients[k - 1].close()
        self.clients[k - 1] = Client(self.fleet.lbs[k - 1].grpc_address)

    def each(self, rpc: str, req) -> list:
        return [c.call(rpc, req) for c in self.clients]

    def apply(self, text: str) -> None:
        for c in self.clients:
            c.call("Apply", pb.ApplyRequest(config_yaml=text))

    def close(self) -> None:
        for c in self.clients:
            c.close()
