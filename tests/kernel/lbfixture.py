"""Helpers for kernel fixture tests: the loaded balancer with empty maps."""
from __future__ import annotations

from dataclasses import dataclass

from scapy.layers.l2 import Ether

from l4lb.dataplane import Dataplane, RuntimeConfig
from l4lb.model import VipKey, VipSpec
from l4lb.reset import clear_maps
from l4lb.state import LbState

LB_MAC = "02:00:00:00:01:01"
CLIENT_MAC = "02:00:00:00:00:0c"
GW_MAC = "02:00:00:00:00:01"


@dataclass
class Result:
    verdict: str
    data: bytes

    @property
    def eth(self) -> Ether:
        return Ether(self.data)


class Lb:
    """The loaded program with helpers to configure it and run packets."""

    def __init__(self, program, capacity):
        self.prog = program
        self.capacity = capacity
        self.dp = Dataplane(program, capacity)
        self.config = RuntimeConfig(gateway_mac=GW_MAC)
        clear_maps(self.dp)
        self.dp.write_config(self.config, portless_vips=0)
        self.state = LbState(capacity, self)

    # Sink: forward to the dataplane and keep the port-less count in the config
    def __getattr__(self, name):
        return getattr(self.dp, name)

    def put_vip(self, key, vip_id, flags, ring):
        self.dp.put_vip(key, vip_id, flags, ring)

    def configure(self, **changes) -> None:
        for k, v in changes.items():
            setattr(self.config, k, v)
        self.dp.write_config(self.config)

    def add_vip(self, address, port, protocol, backends, flags=()):
        spec = VipSpec(VipKey.parse(address, port, protocol), frozenset(flags), dict(backends))
        vip = self.state.add_vip(spec)
        self.dp.set_portless(self.state.portless)
        return vip

    def run(self, pkt) -> Result:
        raw = bytes(pkt)
        r = self.prog.run(raw)
        return Result(r.verdict_name, r.data)

    def stats(self) -> dict[str, int]:
        return self.dp.global_stats()


