"""The load balancer's state and how it maps onto the BPF maps: VIP ids,
backend indices and generations, and the ring of each VIP. No bcc, no gRPC.

Writes go through a `Sink` (l4lb.dataplane.Dataplane in production) in an
order that never lets a packet see a half-written ring or a freed backend:
new backends are written before any ring names them; a VIP's idle ring copy
is written whole before the VIP is flipped to it; a backend no ring names any
more is invalidated last."""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from . import maglev
from .consts import Capacity
from .errors import AlreadyExistsError, CapacityError, NotFoundError, ValidationError
from .model import VipKey, VipSpec, check_backend_family, flags_to_bits, parse_address


class Sink(Protocol):
    def put_backend(self, index: int, address: str, generation: int, valid: bool,
                    vips: Iterable[int] = ()) -> None: ...
    def write_ring(self, vip_id: int, copy: int, slots: np.ndarray) -> None: ...
    def put_vip(self, key: VipKey, vip_id: int, flags: int, ring: int) -> None: ...
    def delete_vip(self, key: VipKey) -> None: ...
    def put_vip_address(self, address: str, count: int) -> None: ...
    def put_vip_info(self, vip_id: int, generation: int, flags: int) -> None: ...
    def clear_vip_stats(self, vip_id: int) -> None: ...


@dataclass
class VipState:
    key: VipKey
    vip_id: int
    flags: frozenset[str]
    backends: dict[str, int] = field(default_factory=dict)  # address -> weight
    ring: int = 0  # active copy


@dataclass
class BackendState:
    index: int
    generation: int
    refs: int = 0  # VIPs that list this backend


class LbState:
    def __init__(self, capacity: Capacity, sink: Sink):
        self.capacity = capacity
        self.sink = sink
        self.vips: dict[VipKey, VipState] = {}
        self.backends: dict[str, BackendState] = {}
        self.generations = [0] * (capacity.max_backends + 1)  # last generation per index
        self.vip_generations = [0] * capacity.max_vips  # last generation per VIP id
        self.portless = 0

    # ---- allocation -------------------------------------------------------------
    def _free_vip_id(self) -> int:
        used = {v.vip_id for v in self.vips.values()}
        for i in range(self.capacity.max_vips):
            if i not in used:
                return i
        raise CapacityError(f"VIP capacity is full ({self.capacity.max_vips} VIPs); "
                            "delete a VIP or restart `l4lb run` with a larger --max-vips")

    def _free_backend_indices(self, n: int) -> list[int]:
        used = {b.index for b in self.backends.values()}
        # least recently used generation first, so a freed index is reused late
        free = [i for i in range(1, self.capacity.max_backends + 1) if i not in used]
        if len(free) < n:
            raise CapacityError(f"backend capacity is full ({self.capacity.max_backends} backends, "
                                f"{n} more needed); remove backends or restart with a larger --max-backends")
        free.sort(key=lambda i: (self.generations[i], i))
        return free[:n]

    # ---- ring ---------------------------------------------------------------------
    def ring_slots(self, backends: dict[str, int], index_of: dict[str, int] | None = None) -> np.ndarray:
        """Backend index per ring slot (0 = none) for these backends and weights."""
        index_of = index_of or {a: self.backends[a].index for a in backends}
        addrs = list(backends)
        if not addrs:
            return np.zeros(self.capacity.ring_size, dtype=np.uint32)
        keys = [ipaddress.ip_address(a).packed for a in addrs]
        pos = maglev.maglev_indices(keys, [backends[a] for a in addrs], self.capacity.ring_size)
        lut = np.array([index_of[a] for a in addrs] + [0], dtype=np.uint32)
        return lut[pos]  # position -1 picks the trailing 0

    # ---- changes --------------------------------------------------------------------
    def add_vip(self, spec: VipSpec) -> VipState:
        if spec.key in self.vips:
            raise AlreadyExistsError(f"VIP {spec.key} exists already")
        for addr in spec.backends:
            check_backend_family(spec.key.ip, parse_address(addr), f"backend {addr}")
        vip_id = self._free_vip_id()
        new_addrs = [a for a in spec.backends if a not in self.backends]
        indices = self._free_backend_indices(len(new_addrs))
        vip = VipState(spec.key, vip_id, spec.flags, dict(spec.backends), ring=0)
        # backends first, then the ring, then the VIP that points to the ring
        self._acquire(new_addrs, indices, vip_id)
        for a in spec.backends:
            if a not in new_addrs:
                self.backends[a].refs += 1
                self._put_listed(a, vip_id)
        self.sink.write_ring(vip_id, 0, self.ring_slots(vip.backends))
        self.sink.clear_vip_stats(vip_id)
        # a new generation: entries that an earlier holder of the id made are not ours
        self.vip_generations[vip_id] += 1
        self.sink.put_vip_info(vip_id, self.vip_generations[vip_id], flags_to_bits(spec.flags))
        self.sink.put_vip(spec.key, vip_id, flags_to_bits(spec.flags), 0)
        self.vips[spec.key] = vip
        if spec.key.port == 0:
            self.portless += 1
        self._sync_address(spec.key.address)
        return vip

    def delete_vip(self, key: VipKey) -> None:
        vip = self.get(key)
        self.sink.delete_vip(key)
        # the VIP's connection-table entries stop being used at once
        self.vip_generations[vip.vip_id] += 1
        self.sink.put_vip_info(vip.vip_id, self.vip_generations[vip.vip_id], 0)
        del self.vips[key]
        if key.port == 0:
            self.portless -= 1
        self._sync_address(key.address)
        self._release(list(vip.backends))

    def set_backends(self, key: VipKey, backends: dict[str, int]) -> None:
        """Replaces the VIP's backends and weights with `backends`, all at once."""
        vip = self.get(key)
        for addr in backends:
            check_backend_family(key.ip, parse_address(addr), f"backend {addr}")
        added = [a for a in backends if a not in vip.backends]
        removed = [a for a in vip.backends if a not in backends]
        new_addrs = [a for a in added if a not in self.backends]
        indices = self._free_backend_indices(len(new_addrs))
        self._acquire(new_addrs, indices, vip.vip_id)
        for a in added:
            if a not in new_addrs:
                self.backends[a].refs += 1
                self._put_listed(a, vip.vip_id)
        idle = 1 - vip.ring
        self.sink.write_ring(vip.vip_id, idle, self.ring_slots(backends))
        self.sink.put_vip(key, vip.vip_id, flags_to_bits(vip.flags), idle)
        vip.ring = idle
        vip.backends = dict(backends)
        self._release(removed)

    def set_flags(self, key: VipKey, flags: frozenset[str]) -> None:
        vip = self.get(key)
        self.sink.put_vip_info(vip.vip_id, self.vip_generations[vip.vip_id], flags_to_bits(flags))
        self.sink.put_vip(key, vip.vip_id, flags_to_bits(flags), vip.ring)
        vip.flags = flags

    # ---- helpers --------------------------------------------------------------------
    def get(self, key: VipKey) -> VipState:
        try:
            return self.vips[key]
        except KeyError:
            raise NotFoundError(f"VIP {key} does not exist") from None

    def _acquire(self, addrs: list[str], indices: list[int], vip_id: int) -> None:
        for addr, idx in zip(addrs, indices):
            self.generations[idx] += 1
            self.backends[addr] = BackendState(idx, self.generations[idx], refs=1)
            self.sink.put_backend(idx, addr, self.generations[idx], True, [vip_id])

    def _release(self, addrs: list[str]) -> None:
        """After the VIP stopped listing addrs (its ring flipped, its backends updated)."""
        for addr in addrs:
            b = self.backends[addr]
            b.refs -= 1
            if b.refs == 0:
                self.sink.put_backend(b.index, addr, b.generation, False)
                del self.backends[addr]
            else:  # other VIPs keep it: only this VIP's connection-table entries re-pick
                self._put_listed(addr)

    def _put_listed(self, addr: str, also: int | None = None) -> None:
        """Rewrites a live backend with the VIPs that list it (and VIP `also`,
        which is about to): written before a ring names it, after one stops."""
        b = self.backends[addr]
        ids = {v.vip_id for v in self.vips.values() if addr in v.backends}
        if also is not None:
            ids.add(also)
        self.sink.put_backend(b.index, addr, b.generation, True, sorted(ids))

    def _sync_address(self, address: str) -> None:
        n = sum(1 for k in self.vips if k.address == address)
        self.sink.put_vip_address(address, n)


def validate_specs(specs: list[VipSpec]) -> None:
    seen = set()
    for s in specs:
        if s.key in seen:
            raise ValidationError(f"VIP {s.key} is listed twice")
        seen.add(s.key)


def state_to_dict(st: LbState) -> dict:
    return {
        "vips": [{"address": v.key.address, "port": v.key.port, "protocol": v.key.protocol,
                  "vip_id": v.vip_id, "flags": sorted(v.flags), "ring": v.ring,
                  "backends": v.backends} for v in st.vips.values()],
        "backends": {a: {"index": b.index, "generation": b.generation, "refs": b.refs}
                     for a, b in st.backends.items()},
        "generations": {str(i): g for i, g in enumerate(st.generations) if g},
        "vip_generations": {str(i): g for i, g in enumerate(st.vip_generations) if g},
    }


def state_from_dict(st: LbState, doc: dict) -> None:
    """Restores ids, generations and rings' active copies without writing maps
    (the pinned maps already hold them)."""
    for i, g in doc.get("generations", {}).items():
        st.generations[int(i)] = g
    for i, g in doc.get("vip_generations", {}).items():
        st.vip_generations[int(i)] = g
    for a, b in doc.get("backends", {}).items():
        st.backends[a] = BackendState(b["index"], b["generation"], b["refs"])
    for v in doc.get("vips", []):
        key = VipKey(v["address"], v["port"], v["protocol"])
        st.vips[key] = VipState(key, v["vip_id"], frozenset(v["flags"]), dict(v["backends"]), v["ring"])
        if key.port == 0:
            st.portless += 1
