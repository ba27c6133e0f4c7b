"""The connection table seen from user space (xdp/conntrack.h): an array map
of buckets of CT_WAYS flows each, shown as a mapping flow key -> ct_entry with
the layouts bcc takes from the compiled program (Key: flow4_key or flow_key,
Leaf: ct_entry), so that readers and tests index it like a hash map.

Placement is the data plane's: a flow lives in the first of its two buckets
while that has an empty way, else in the second; ways fill in order. A write
from here (tests, restoring an entry) places a flow the same way; a delete
keeps the way's key and clears its backend, as the data plane expects (a
cleared way is taken first when both buckets are full). Writes from user space
rewrite a whole bucket: one that the data plane writes at the same moment may
lose that entry (the flow then takes a fresh pick and writes it again), so
user space writes only to flush flows and in tests. Reads of the whole table
take a few batch syscalls.

A SYN's entry waits in the family's SYN table (slot = key hash mod its
slots) until the flow's next packet moves it into the connection table; an
entry there is newer than one in the buckets. The mapping shows both as one:
a key's entry is its SYN slot's when that holds the key, else its bucket's;
writes go into the buckets and empty the key's SYN slot, deletes remove the
key from both."""
from __future__ import annotations

import ctypes

import numpy as np

from . import consts, libbpf

_MASK32 = 0xFFFFFFFF


def bucket1(h: int, buckets: int) -> int:
    return (h * buckets) >> 32


def bucket2(h: int, buckets: int) -> int:
    """xdp/conntrack.h ct_bucket2."""
    h ^= consts.CT_SEED2
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    h ^= h >> 16
    return (h * buckets) >> 32


def key_hash(raw: bytes) -> int:
    """xdp/conntrack.h ct_key_hash of a key's bytes (flow4_key or flow_key):
    FNV-1a over its little-endian 32-bit words, then murmur's finalizer."""
    h = 0x811C9DC5
    for i in range(0, len(raw), 4):
        h = ((h ^ int.from_bytes(raw[i:i + 4], "little")) * 0x01000193) & _MASK32
    h ^= len(raw) // 4
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    h ^= h >> 16
    return h


class CtTable:
    """One family's table. Key and Leaf are bcc's ctypes types; items(),
    t[key], t[key] = leaf, del t[key], len(t) and clear() as for a hash map.
    `syn` is the family's SYN table (an array of single ways)."""

    def __init__(self, table, name: str = "", syn=None):
        self.table = table
        self.name = name
        way = dict(table.Leaf._fields_)["way"]._type_
        fields = dict(way._fields_)
        self.Key = fields["key"]
        self.Leaf = fields["e"]
        self.map_fd = table.map_fd
        self.buckets = table.max_entries
        self.ways = consts.CT_WAYS
        self.key_size = ctypes.sizeof(self.Key)
        self.entry_size = ctypes.sizeof(self.Leaf)
        self.way_size = ctypes.sizeof(way)
        self.bucket_size = ctypes.sizeof(table.Leaf)
        self.syn = syn
        self.syn_slots = syn.max_entries if syn is not None else 0

    # ---- the SYN table -------------------------------------------------------------------
    def syn_slot(self, raw: bytes) -> int:
        """xdp/balancer.c ct_syn_slot: the key's slot of the SYN table."""
        return key_hash(raw) & (self.syn_slots - 1)

    def _syn_way(self, raw: bytes):
        """(slot, way) when the key's SYN slot holds its entry, else None."""
        if self.syn is None:
            return None
        i = self.syn_slot(raw)
        way = self.syn[self.syn.Key(i)]
        if bytes(way.key) != raw or not way.e.backend:
            return None
        return i, way

    def _syn_clear(self, raw: bytes) -> bool:
        found = self._syn_way(raw)
        if found is None:
            return False
        i, way = found
        self.syn[self.syn.Key(i)] = type(way)()
        return True

    def _syn_data(self):
        """Every slot of the SYN table as bytes, shape (slots, way size); None without one."""
        if self.syn is None:
            return None
        raw = libbpf.array_read(self.syn.map_fd, self.syn_slots, self.way_size, name=f"{self.name} SYN table")
        return np.frombuffer(raw, dtype=np.uint8).reshape(self.syn_slots, self.way_size)

    def syn_items(self):
        """(key, entry) of every flow in the SYN table."""
        if self.syn is None:
            return []
        return self._items(self._syn_data())

    # ---- buckets ----------------------------------------------------------------------------
    def _read(self, i: int):
        return self.table[self.table.Key(i)]

    def _write(self, i: int, bucket) -> None:
        self.table[self.table.Key(i)] = bucket

    def _buckets_of(self, raw: bytes) -> tuple[int, int]:
        h = key_hash(raw)
        return bucket1(h, self.buckets), bucket2(h, self.buckets)

    def _find(self, key):
        """(bucket index, bucket, way) of the key, or None."""
        raw = bytes(key)
        i1, i2 = self._buckets_of(raw)
        b = self._read(i1)
        for w in range(self.ways):
            k = bytes(b.way[w].key)
            if not any(k):
                return None  # the first bucket has room: the flow is not in the second
            if k == raw:
                return i1, b, w
        b = self._read(i2)
        for w in range(self.ways):
            if bytes(b.way[w].key) == raw:
                return i2, b, w
        return None

    # ---- the mapping --------------------------------------------------------------------------
    def __getitem__(self, key):
        syn = self._syn_way(bytes(key))
        if syn is not None:
            return self.Leaf.from_buffer_copy(bytes(syn[1].e))
        found = self._find(key)
        if found is None or not found[1].way[found[2]].e.backend:
            raise KeyError(key)
        i, b, w = found
        return self.Leaf.from_buffer_copy(bytes(b.way[w].e))

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def __setitem__(self, key, leaf) -> None:
        raw = bytes(key)
        found = self._find(key)
        if found is None:
            found = self._free_way(raw)
        i, b, w = found
        seq = b.way[w].e.seq
        ctypes.memmove(ctypes.addressof(b) + w * self.way_size, raw, self.key_size)
        ctypes.memmove(ctypes.addressof(b) + w * self.way_size + self.key_size, bytes(leaf),
                       self.entry_size)
        b.way[w].e.seq = (seq + 2) & ~1 & _MASK32
        self._write(i, b)
        self._syn_clear(raw)

    def _free_way(self, raw: bytes):
        i1, i2 = self._buckets_of(raw)
        for i in (i1, i2):
            b = self._read(i)
            for w in range(self.ways):
                if not any(bytes(b.way[w].key)):
                    return i, b, w
        for i in (i1, i2):
            b = self._read(i)
            for w in range(self.ways):
                if not b.way[w].e.backend:
                    return i, b, w
        from .errors import CapacityError  # noqa: PLC0415

        raise CapacityError(f"connection table {self.name!r}: both buckets of the flow are full")

    def __delitem__(self, key) -> None:
        syn = self._syn_clear(bytes(key))
        found = self._find(key)
        if found is None or not found[1].way[found[2]].e.backend:
            if syn:
                return
            raise KeyError(key)
        i, b, w = found
        b.way[w].e.backend = 0
        b.way[w].e.seq = (b.way[w].e.seq + 2) & ~1 & _MASK32
        self._write(i, b)

    # ---- the whole table ----------------------------------------------------------------------
    def read_all(self) -> np.ndarray:
        """Every bucket as bytes, shape (buckets, bucket size)."""
        raw = libbpf.array_read(self.map_fd, self.buckets, self.bucket_size, name=self.name)
        return np.frombuffer(raw, dtype=np.uint8).reshape(self.buckets, self.bucket_size)

    def _live(self, data: np.ndarray):
        """(keys, entries, live mask) of every way: keys (buckets*ways, key size) bytes,
        entries (buckets*ways, entry size) bytes."""
        ways = data.reshape(-1, self.way_size)
        keys = ways[:, :self.key_size]
        entries = ways[:, self.key_size:self.key_size + self.entry_size]
        backend = entries[:, :4].copy().view(np.uint32).ravel()
        return keys, entries, backend != 0

    def _items(self, data: np.ndarray):
        """(key, entry) of every live way of data (buckets or SYN-table slots)."""
        keys, entries, live = self._live(data)
        return [(self.Key.from_buffer_copy(keys[j].tobytes()), self.Leaf.from_buffer_copy(entries[j].tobytes()))
                for j in np.flatnonzero(live)]

    def bucket_items(self):
        """(key, entry) of every flow in the buckets, the SYN table left out."""
        return self._items(self.read_all())

    def items(self):
        """Every flow with an entry, once: its SYN slot's entry when it has one."""
        out = {bytes(k): e for k, e in self.bucket_items()}
        out.update((bytes(k), e) for k, e in self.syn_items())
        return [(self.Key.from_buffer_copy(k), e) for k, e in out.items()]

    def __len__(self) -> int:
        """Flows with an entry, each once (numpy over whole-table reads: no
        per-entry objects, so that counting a full table stays cheap)."""
        keys, _, live = self._live(self.read_all())
        n = int(live.sum())
        syn = self._syn_data()
        if syn is None:
            return n
        skeys, _, slive = self._live(syn)
        if not slive.any():
            return n
        wide = f"V{self.key_size}"
        in_buckets = np.isin(np.ascontiguousarray(skeys[slive]).view(wide).ravel(),
                             np.ascontiguousarray(keys[live]).view(wide).ravel())
        return n + int((~in_buckets).sum())

    def keys(self):
        return [k for k, _ in self.items()]

    def clear(self) -> None:
        libbpf.array_write(self.map_fd, 0, bytes(self.buckets * self.bucket_size), self.bucket_size,
                           name=self.name)
        if self.syn is not None:
            libbpf.array_write(self.syn.map_fd, 0, bytes(self.syn_slots * self.way_size), self.way_size,
                               name=f"{self.name} SYN table")

    def remove_all(self, keys: bytes) -> int:
        """Removes the given flows (keys packed one after another) for good:
        their ways become empty, the later ways of each bucket move up. Safe
        only while nothing else writes the table, and when no flow that stays
        lives in its second bucket because of a bucket one of these flows
        leaves (benchmarks remove exactly the flows a round added). Returns
        how many were found (a flow in both its SYN slot and a bucket counts once)."""
        data = self.read_all().copy()
        syn = self._syn_data()
        ks = self.key_size
        n = len(keys) // ks
        touched = set()
        found = 0
        for j in range(n):
            raw = keys[j * ks:(j + 1) * ks]
            in_syn = False
            if syn is not None:
                slot = syn[self.syn_slot(raw)]
                in_syn = slot[:ks].tobytes() == raw and slot[ks:ks + 4].any()
                if in_syn:
                    self.syn[self.syn.Key(self.syn_slot(raw))] = self.syn.Leaf()
            found += self._remove_from_buckets(data, raw, touched) or int(in_syn)
        for i in sorted(touched):
            libbpf.array_write(self.map_fd, i, data[i].tobytes(), self.bucket_size, name=self.name)
        return found

    def _remove_from_buckets(self, data: np.ndarray, raw: bytes, touched: set) -> int:
        ks = self.key_size
        for i in self._buckets_of(raw):
            ways = data[i].reshape(self.ways, self.way_size)
            hit = next((w for w in range(self.ways) if ways[w, :ks].tobytes() == raw), None)
            if hit is None:
                continue
            ways[hit:-1] = ways[hit + 1:].copy()
            ways[-1] = 0
            touched.add(i)
            return 1
        return 0
