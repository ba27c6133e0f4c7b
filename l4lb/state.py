"""The load balancer's desired state and how it reaches the BPF maps. No bcc,
no gRPC.

Three pieces:
- `LbModel`: VIPs, backend indices and generations, VIP ids and generations,
  each VIP's active ring copy. Pure: a change validates whole before it
  touches anything, and `clone()` makes the copy a request is computed on.
- `MapImage`: what the maps hold (or should hold): `LbModel.image()` gives the
  desired one, `Dataplane.read_image()` the one a running program has.
- `sync(have, want, sink)`: the writes that turn one image into the other, in
  an order that never lets a packet see a half-written ring or a freed backend,
  starting from any image, so it is idempotent and finishes an interrupted
  change: VIPs that go are removed first; backends are written before any ring
  names them (with the bits of every VIP that lists them, before and after);
  a VIP's idle ring copy is written whole before the VIP flips to it; a backend
  no ring names any more is invalidated last.

`LbState` couples a model with a sink and the image last written, for users
that change and write in one step (kernel fixtures, replay, benchmarks)."""
from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol

import numpy as np

from . import consts, maglev, timings
from .consts import Capacity
from .errors import AlreadyExistsError, CapacityError, NotFoundError, StateError, ValidationError
from .health import HealthCheck, effective_weights, parse_health
from .model import (VipKey, VipSpec, check_backend_family, flags_to_bits, parse_address, parse_encap,
                    parse_flags)


class Sink(Protocol):
    def put_backend(self, index: int, address: str, generation: int, valid: bool,
                    vips: Iterable[int] = ()) -> None: ...
    def write_ring(self, vip_id: int, copy: int, slots: np.ndarray) -> None: ...
    def put_vip(self, key: VipKey, vip_id: int, flags: int, ring: int) -> None: ...
    def delete_vip(self, key: VipKey) -> None: ...
    def put_vip_addresses(self, counts: dict[str, int]) -> None: ...
    def put_vip_info(self, vip_id: int, generation: int, flags: int) -> None: ...
    def clear_vip_stats(self, vip_id: int) -> None: ...
    def clear_backend_stats(self, index: int) -> None: ...
    def clear_fib_hop(self, index: int) -> None: ...
    def set_portless(self, n: int) -> None: ...


@dataclass
class VipState:
    key: VipKey
    vip_id: int
    flags: frozenset[str]
    backends: dict[str, int] = field(default_factory=dict)  # address -> weight, as the operator set it
    ring: int = 0  # active copy
    health: HealthCheck | None = None
    down: frozenset[str] = frozenset()  # backends a health check found down
    # the ring's content, ((address, index, effective weight), ...), kept until the
    # backends, their health or the check change (LbModel.ring_spec)
    spec: tuple | None = None
    encap: str = consts.DEFAULT_ENCAP  # ipip | gue

    def clone(self) -> "VipState":
        return VipState(self.key, self.vip_id, self.flags, dict(self.backends), self.ring, self.health,
                        self.down, self.spec, self.encap)

    @property
    def bits(self) -> int:
        """vip_meta.flags / vip_info.flags: the flags and the encapsulation."""
        return flags_to_bits(self.flags, self.encap)

    def effective(self) -> tuple[dict[str, int], bool]:
        """(the weights the ring is built from, whether health is ignored: panic)."""
        return effective_weights(self.backends, self.down, self.health)


@dataclass
class BackendState:
    index: int
    generation: int
    refs: int = 0  # VIPs that list this backend


# ---- the image of the maps ---------------------------------------------------------------
@dataclass(frozen=True)
class Ring:
    """A ring's content: the backends it is built from (desired), or the
    slots read back from the kernel (observed); compared by slots when needed."""

    spec: tuple | None  # ((address, index, weight), ...) sorted
    slots: np.ndarray | None = None

    def array(self, capacity: Capacity) -> np.ndarray:
        if self.slots is None:
            object.__setattr__(self, "slots", ring_slots(capacity, self.spec))
        return self.slots

    def same(self, other: "Ring", capacity: Capacity) -> bool:
        if self.spec is not None and other.spec is not None:
            return self.spec == other.spec
        return bool(np.array_equal(self.array(capacity), other.array(capacity)))


@dataclass
class BackendEntry:
    address: str
    generation: int
    vips: frozenset[int]  # ids of the VIPs that list it


@dataclass
class MapImage:
    vips: dict[VipKey, tuple[int, int, int]] = field(default_factory=dict)  # key -> (vip_id, flag bits, ring)
    rings: dict[int, Ring] = field(default_factory=dict)  # vip_id -> its active copy's content
    vip_info: dict[int, tuple[int, int]] = field(default_factory=dict)  # vip_id -> (generation, flag bits); absent: (0, 0)
    backends: dict[int, BackendEntry] = field(default_factory=dict)  # index -> valid backend
    addresses: dict[str, int] = field(default_factory=dict)  # VIP address -> VIPs on it
    portless: int = 0


@lru_cache(maxsize=65536)
def _packed(address: str) -> bytes:
    return ipaddress.ip_address(address).packed


def ring_slots(capacity: Capacity, spec: tuple) -> np.ndarray:
    """Backend index per ring slot (0 = none) for ((address, index, weight), ...)."""
    if not spec:
        return np.zeros(capacity.ring_size, dtype=np.uint32)
    with timings.timed(timings.RING_BUILD):
        keys = [_packed(a) for a, _, _ in spec]
        pos = maglev.maglev_indices(keys, [w for _, _, w in spec], capacity.ring_size)
        lut = np.array([i for _, i, _ in spec] + [0], dtype=np.uint32)
        return lut[pos]  # position -1 picks the trailing 0


def _no_step(_name: str) -> None:
    pass


def sync(have: MapImage, want: MapImage, sink: Sink, capacity: Capacity,
         step: Callable[[str], None] = _no_step) -> None:
    """Writes what differs between `have` (what the maps hold) and `want`;
    step(name) is called after each phase (the crash tests stop there)."""
    # 1. VIPs that go, or whose id changes: packets to them stop at once
    for key, (vid, _, _) in have.vips.items():
        if key not in want.vips or want.vips[key][0] != vid:
            sink.delete_vip(key)
    step("sync.vips-removed")
    # 2. generations and flags; a new holder of an id starts from zero counters
    for vid in sorted(set(have.vip_info) | set(want.vip_info)):
        old, new = have.vip_info.get(vid, (0, 0)), want.vip_info.get(vid, (0, 0))
        if old != new:
            if new[0] != old[0] and any(v[0] == vid for v in want.vips.values()):
                sink.clear_vip_stats(vid)
            sink.put_vip_info(vid, *new)
    step("sync.generations")
    # 3. backends before any ring names them, listed by the VIPs of both images;
    # an index given to another backend (or first used) starts from zero counters
    # and with no FIB answer kept (next_hop fib: the old address's next hop is
    # not the new one's): no ring and no valid connection-table entry names it
    # yet, so no packet uses it meanwhile, and a backend that keeps its index
    # keeps its counts and its answers
    listed: dict[int, frozenset[int]] = {}
    for idx, b in want.backends.items():
        old = have.backends.get(idx)
        same = old is not None and (old.address, old.generation) == (b.address, b.generation)
        listed[idx] = b.vips | (old.vips if same else frozenset())
        if not same:
            sink.clear_backend_stats(idx)
            sink.clear_fib_hop(idx)
        if not same or old.vips != listed[idx]:
            sink.put_backend(idx, b.address, b.generation, True, sorted(listed[idx]))
    step("sync.backends-added")
    # 4. rings: the idle copy written whole, then the VIP flipped to it
    live = {vid: (key, ring) for key, (vid, _, ring) in have.vips.items()
            if key in want.vips and want.vips[key][0] == vid}
    for key, (vid, bits, ring) in want.vips.items():
        was = live.get(vid)
        if was and was[1] == ring:
            if not have.rings[vid].same(want.rings[vid], capacity):
                raise StateError(f"VIP {key}: its active ring copy {ring} holds another table; "
                                 "flip it (LbModel.resolve) before writing")
        else:
            sink.write_ring(vid, ring, want.rings[vid].array(capacity))
            step("sync.ring-written")
        if have.vips.get(key) != (vid, bits, ring):
            sink.put_vip(key, vid, bits, ring)
            step("sync.vip-written")
    step("sync.rings-flipped")
    # 5. addresses (the VIP filter) and the port-less count
    changed = {a: want.addresses.get(a, 0) for a in sorted(set(have.addresses) | set(want.addresses))
               if have.addresses.get(a, 0) != want.addresses.get(a, 0)}
    if changed:
        sink.put_vip_addresses(changed)
    if have.portless != want.portless:
        sink.set_portless(want.portless)
    step("sync.addresses")
    # 6. backends as listed now; those no ring names any more are invalidated
    for idx, b in want.backends.items():
        if listed[idx] != b.vips:
            sink.put_backend(idx, b.address, b.generation, True, sorted(b.vips))
    for idx, b in have.backends.items():
        if idx not in want.backends:
            sink.put_backend(idx, b.address, b.generation, False)
    step("sync.done")


# ---- the model ------------------------------------------------------------------------------
class LbModel:
    def __init__(self, capacity: Capacity):
        self.capacity = capacity
        self.vips: dict[VipKey, VipState] = {}
        self.backends: dict[str, BackendState] = {}
        self.generations = [0] * (capacity.max_backends + 1)  # last generation per index
        self.vip_generations = [0] * capacity.max_vips  # last generation per VIP id
        # indices the maps may still name: not handed to another address until
        # a change that stops naming them has been written (see reserve())
        self.reserved: frozenset[int] = frozenset()

    def clone(self) -> "LbModel":
        c = LbModel.__new__(LbModel)
        c.capacity = self.capacity
        c.vips = {k: v.clone() for k, v in self.vips.items()}
        c.backends = {a: BackendState(b.index, b.generation, b.refs) for a, b in self.backends.items()}
        c.generations = list(self.generations)
        c.vip_generations = list(self.vip_generations)
        c.reserved = self.reserved
        return c

    def reserve(self) -> None:
        """After the maps reflect this model: its indices are the ones rings name."""
        self.reserved = frozenset(b.index for b in self.backends.values())

    @property
    def portless(self) -> int:
        return sum(1 for k in self.vips if k.port == 0)

    def get(self, key: VipKey) -> VipState:
        try:
            return self.vips[key]
        except KeyError:
            raise NotFoundError(f"VIP {key} does not exist") from None

    # ---- allocation -------------------------------------------------------------
    def _free_vip_id(self) -> int:
        used = {v.vip_id for v in self.vips.values()}
        for i in range(self.capacity.max_vips):
            if i not in used:
                return i
        raise CapacityError(f"VIP capacity is full ({self.capacity.max_vips} VIPs); "
                            "delete a VIP or restart `l4lb run` with a larger --max-vips")

    def _free_backend_indices(self, n: int) -> list[int]:
        if not n:
            return []
        used = {b.index for b in self.backends.values()} | self.reserved
        free = [i for i in range(1, self.capacity.max_backends + 1) if i not in used]
        if len(free) < n:
            raise CapacityError(f"backend capacity is full ({self.capacity.max_backends} backends, "
                                f"{n} more needed); remove backends or restart with a larger --max-backends")
        # least recently used generation first, so a freed index is reused late
        free.sort(key=lambda i: (self.generations[i], i))
        return free[:n]

    # ---- changes: each validates whole before it changes anything -----------------
    def add_vip(self, spec: VipSpec) -> VipState:
        if spec.key in self.vips:
            raise AlreadyExistsError(f"VIP {spec.key} exists already")
        for addr in spec.backends:
            check_backend_family(spec.key.ip, parse_address(addr), f"backend {addr}")
        self._check_ring_room(spec.backends)
        vip_id = self._free_vip_id()
        new_addrs = [a for a in spec.backends if a not in self.backends]
        indices = self._free_backend_indices(len(new_addrs))
        self._acquire(new_addrs, indices)
        for a in spec.backends:
            if a not in new_addrs:
                self.backends[a].refs += 1
        # a new generation: entries that an earlier holder of the id made are not ours
        self.vip_generations[vip_id] += 1
        vip = VipState(spec.key, vip_id, frozenset(spec.flags), dict(spec.backends), ring=0,
                       encap=spec.encap)
        self.vips[spec.key] = vip
        return vip

    def delete_vip(self, key: VipKey) -> None:
        vip = self.get(key)
        # the VIP's connection-table entries stop being used at once
        self.vip_generations[vip.vip_id] += 1
        del self.vips[key]
        self._release(list(vip.backends))

    def set_backends(self, key: VipKey, backends: dict[str, int]) -> None:
        """Replaces the VIP's backends and weights with `backends`, all at once."""
        vip = self.get(key)
        added = [a for a in backends if a not in vip.backends]
        for addr in added:
            check_backend_family(key.ip, parse_address(addr), f"backend {addr}")
        self._check_ring_room(backends)
        removed = [a for a in vip.backends if a not in backends]
        new_addrs = [a for a in added if a not in self.backends]
        indices = self._free_backend_indices(len(new_addrs))
        self._acquire(new_addrs, indices)
        for a in added:
            if a not in new_addrs:
                self.backends[a].refs += 1
        vip.backends = dict(backends)
        vip.down = frozenset(a for a in vip.down if a in backends)
        vip.spec = None
        self._release(removed)

    def set_flags(self, key: VipKey, flags: frozenset[str]) -> None:
        self.get(key).flags = frozenset(flags)

    def set_encap(self, key: VipKey, encap: str) -> None:
        """Established flows change with it: their next packet leaves in the new encapsulation."""
        self.get(key).encap = parse_encap(encap)

    def set_health_check(self, key: VipKey, check: HealthCheck | None) -> None:
        """A check on a VIP that had none starts from every backend up (no
        probe has failed yet); a check that replaces another keeps each
        backend's state, as the prober keeps its findings and counts; no
        check, no backend down."""
        vip = self.get(key)
        if check is not None and not check.port and not key.port:
            raise ValidationError(f"health.port: VIP {key} takes every port; give the port to probe")
        if vip.health != check:
            down = vip.down if vip.health is not None and check is not None else frozenset()
            vip.health, vip.down, vip.spec = check, down, None

    def set_backend_health(self, key: VipKey, address: str, up: bool) -> None:
        vip = self.get(key)
        if address not in vip.backends:
            raise NotFoundError(f"backend {address} is not on VIP {key}")
        vip.down = vip.down - {address} if up else vip.down | {address}
        vip.spec = None

    def _check_ring_room(self, backends: dict[str, int]) -> None:
        live = sum(1 for w in backends.values() if w > 0)
        if live > self.capacity.ring_size:
            raise ValidationError(f"{live} backends with a positive weight do not fit a ring of "
                                  f"{self.capacity.ring_size} slots")

    def _acquire(self, addrs: list[str], indices: list[int]) -> None:
        for addr, idx in zip(addrs, indices):
            self.generations[idx] += 1
            self.backends[addr] = BackendState(idx, self.generations[idx], refs=1)

    def _release(self, addrs: list[str]) -> None:
        for addr in addrs:
            b = self.backends[addr]
            b.refs -= 1
            if b.refs == 0:
                del self.backends[addr]

    # ---- what the maps should hold ----------------------------------------------------
    def image(self) -> MapImage:
        img = MapImage(portless=self.portless)
        listing: dict[str, set[int]] = {a: set() for a in self.backends}
        for key, v in self.vips.items():
            img.vips[key] = (v.vip_id, v.bits, v.ring)
            img.rings[v.vip_id] = Ring(self.ring_spec(v))
            img.addresses[key.address] = img.addresses.get(key.address, 0) + 1
            for a in v.backends:
                listing[a].add(v.vip_id)
        bits = {v.vip_id: v.bits for v in self.vips.values()}
        for vid, gen in enumerate(self.vip_generations):
            if gen:
                img.vip_info[vid] = (gen, bits.get(vid, 0))
        for a, b in self.backends.items():
            img.backends[b.index] = BackendEntry(a, b.generation, frozenset(listing[a]))
        return img

    def ring_spec(self, v: VipState) -> tuple:
        """What v's ring is built from. Computed once per change of v: a listed
        backend keeps its index, so nothing else can change it."""
        if v.spec is None:
            weights, _ = v.effective()
            v.spec = tuple(sorted((a, self.backends[a].index, w) for a, w in weights.items()))
        return v.spec

    def flip_changed(self, base: "LbModel") -> None:
        """Each VIP whose backends differ from `base`'s (the model the maps
        reflect) takes the idle ring copy, so the new table is written beside
        the live one; every other VIP keeps base's active copy."""
        for key, v in self.vips.items():
            old = base.vips.get(key)
            if old is None or old.vip_id != v.vip_id:
                continue
            v.ring = old.ring if base.ring_spec(old) == self.ring_spec(v) else 1 - old.ring

    def resolve(self, have: MapImage) -> bool:
        """Before writing over `have` (maps of an earlier process): a VIP whose
        active copy holds another table than this model's moves to its idle
        copy, so the live copy is never overwritten. Returns whether any moved."""
        want = self.image()
        moved = False
        for key, v in self.vips.items():
            if have.vips.get(key, (None,))[0] == v.vip_id and have.vips[key][2] == v.ring \
                    and not have.rings[v.vip_id].same(want.rings[v.vip_id], self.capacity):
                v.ring = 1 - v.ring
                moved = True
        return moved

    # ---- persistence ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "vips": [{"address": v.key.address, "port": v.key.port, "protocol": v.key.protocol,
                      "vip_id": v.vip_id, "flags": sorted(v.flags), "encap": v.encap, "ring": v.ring,
                      "backends": v.backends, "health": v.health.to_dict() if v.health else None,
                      "down": sorted(v.down)} for v in self.vips.values()],
            "backends": {a: {"index": b.index, "generation": b.generation}
                         for a, b in self.backends.items()},
            "generations": {str(i): g for i, g in enumerate(self.generations) if g},
            "vip_generations": {str(i): g for i, g in enumerate(self.vip_generations) if g},
        }

    @classmethod
    def from_dict(cls, capacity: Capacity, doc: dict) -> "LbModel":
        """Rebuilds and checks a saved model; any inconsistency is a StateError."""
        try:
            return cls._from_dict(capacity, doc)
        except StateError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            detail = f"missing key {e}" if isinstance(e, KeyError) else str(e)
            raise StateError(f"saved state is malformed ({detail[:120]})") from None

    @classmethod
    def _from_dict(cls, capacity: Capacity, doc: dict) -> "LbModel":
        m = cls(capacity)

        def index(text, limit, what) -> int:
            i = int(text)
            if not 0 <= i < limit:
                raise StateError(f"saved state: {what} {i} is out of range (0-{limit - 1})")
            return i

        for i, g in doc["generations"].items():
            m.generations[index(i, capacity.max_backends + 1, "backend index")] = int(g)
        for i, g in doc["vip_generations"].items():
            m.vip_generations[index(i, capacity.max_vips, "VIP id")] = int(g)
        for a, b in doc["backends"].items():
            addr = str(parse_address(a, "saved backend"))
            idx = index(b["index"], capacity.max_backends + 1, "backend index")
            if idx == 0 or int(b["generation"]) != m.generations[idx]:
                raise StateError(f"saved state: backend {addr} has index {idx} generation {b['generation']}, "
                                 f"which the saved generations do not give it")
            m.backends[addr] = BackendState(idx, int(b["generation"]))
        if len({b.index for b in m.backends.values()}) != len(m.backends):
            raise StateError("saved state: two backends share one index")
        ids = set()
        for v in doc["vips"]:
            key = VipKey.parse(v["address"], v["port"], v["protocol"], "saved VIP")
            vid = index(v["vip_id"], capacity.max_vips, "VIP id")
            if vid in ids or key in m.vips:
                raise StateError(f"saved state: VIP {key} repeats a VIP or its id {vid}")
            if not m.vip_generations[vid]:
                raise StateError(f"saved state: VIP {key} has id {vid}, which has no generation")
            ids.add(vid)
            backends = {}
            for a, w in v["backends"].items():
                addr = str(parse_address(a, "saved backend"))
                if addr not in m.backends:
                    raise StateError(f"saved state: VIP {key} lists backend {addr}, which has no index")
                backends[addr] = int(w)
                m.backends[addr].refs += 1
            if v["ring"] not in (0, 1):
                raise StateError(f"saved state: VIP {key} has ring copy {v['ring']!r} (0 or 1)")
            health = parse_health(v.get("health"), f"saved VIP {key} health")
            down = frozenset(str(parse_address(a, "saved backend")) for a in v.get("down", []))
            if not down <= set(backends):
                raise StateError(f"saved state: VIP {key} has a down backend it does not list")
            m.vips[key] = VipState(key, vid, parse_flags(v["flags"], "saved flags"), backends, v["ring"],
                                   health, down, encap=parse_encap(v.get("encap"), "saved encap"))
        orphans = [a for a, b in m.backends.items() if b.refs == 0]
        if orphans:
            raise StateError(f"saved state: backend {orphans[0]} is listed by no VIP")
        return m


class LbState:
    """A model written to a sink after every change (the maps start empty)."""

    def __init__(self, capacity: Capacity, sink: Sink):
        self.capacity = capacity
        self.sink = sink
        self.model = LbModel(capacity)
        self.applied = MapImage()

    def __getattr__(self, name):  # vips, backends, generations, vip_generations, portless, get
        return getattr(self.model, name)

    def _change(self, fn, *args):
        trial = self.model.clone()
        out = fn(trial, *args)
        trial.flip_changed(self.model)
        want = trial.image()
        sync(self.applied, want, self.sink, self.capacity)
        trial.reserve()
        self.model, self.applied = trial, want
        return out if out is None else trial.vips.get(out.key, out)

    def add_vip(self, spec: VipSpec) -> VipState:
        return self._change(LbModel.add_vip, spec)

    def delete_vip(self, key: VipKey) -> None:
        self._change(LbModel.delete_vip, key)

    def set_backends(self, key: VipKey, backends: dict[str, int]) -> None:
        self._change(LbModel.set_backends, key, backends)

    def set_flags(self, key: VipKey, flags: frozenset[str]) -> None:
        self._change(LbModel.set_flags, key, flags)

    def set_encap(self, key: VipKey, encap: str) -> None:
        self._change(LbModel.set_encap, key, encap)
