"""Maglev consistent hashing (Eisenbud et al., NSDI 2016), weighted by quotas.

Every node of the cluster and the XDP data plane must agree on the table for a
given set of backends, so the construction is fixed exactly:

* Backends with weight 0 are left out (they drain).
* A backend's key is its packed address (4 bytes for IPv4, 16 for IPv6); the
  backends are taken in order of (len(key), key), whatever order they came in.
* offset = mmh3(key, MAGLEV_SEED_OFFSET) % M, skip = mmh3(key, MAGLEV_SEED_SKIP)
  % (M - 1) + 1 and backend i's permutation is (offset + j * skip) % M.
* Quotas: each backend's entry count is fixed before the fill, by
  largest-remainder apportionment of the M entries over the weights. Backend i
  gets floor(M * w_i / W) entries (W the sum of the weights); the entries left
  over, fewer than the number of backends, go one each to the backends with
  the largest remainders (M * w_i) % W, ties going to the backend first in
  order.
* The fill runs rounds until all M entries are taken; in a round each backend
  still below its quota, in order, takes one turn, and a turn claims the first
  free entry left in its permutation. A backend that reaches its quota drops
  out of the later rounds.

Why proportional: the quotas are the counts, and largest remainder keeps each
within one entry of the exact share M * w_i / W, for any weights from 1 to
65535 and any number of backends up to M. (The paper's weighting, weight turns
per round, hands out a whole round of sum(weights) turns at a time, so once
that sum nears or passes M the last round decides the counts and the backends
late in order get few entries or none.) A backend whose exact share is below
one entry may get none: a weight 1 beside weights of 65535 in a small table.

Why equal weights give the paper's tables: with equal weights every remainder
is the same, so the M % N extra entries go to the first M % N backends in
order, which are exactly the backends that take a turn in the paper's last,
partial round. No backend reaches its quota before the table is full, so the
fill is the paper's one-turn-per-round fill entry for entry.

Why one turn per round rather than turns in proportion to weight: the quotas
already fix the counts, so the turn order only decides which entries each
backend gets. One turn each is the paper's order, needs only integers (the C
and Python loops agree trivially), and when measured (100 backends, M = 65537,
weights drawn from 1-3 or 1-100) it changed about as many entries as a
weight-proportional interleaving when a backend left, and fewer when one
backend's weight grew by a tenth; both changed far fewer than turns by weight.

Quotas and fill depend only on the keys and the weights, and scaling every
weight by the same factor changes neither, so {a: 2, b: 2} builds the same
table as {a: 1, b: 1}.

The fill loop is sequential, so it lives in C (l4lb/_maglev_fill.c, loaded
with ctypes). Without the compiled library a pure-Python loop gives the same
tables, only slower.
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import ipaddress
import logging
import math
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import mmh3
import numpy as np

from .consts import DEFAULT_RING_SIZE, MAGLEV_SEED_OFFSET, MAGLEV_SEED_SKIP, MAX_WEIGHT
from .errors import ValidationError

__all__ = [
    "MIN_SIZE",
    "MAX_SIZE",
    "MAX_WEIGHT",
    "maglev_table",
    "maglev_indices",
    "reference_table",
    "permutation_params",
    "entry_counts",
    "accelerated",
]

MIN_SIZE = 3
MAX_SIZE = 1 << 24

log = logging.getLogger(__name__)

# --- validation ----------------------------------------------------------------


@lru_cache(maxsize=64)
def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


def _check_size(size: object) -> int:
    if not isinstance(size, int) or isinstance(size, bool):
        raise ValidationError(f"Maglev table size {size!r} is not an integer; use a prime such as {DEFAULT_RING_SIZE}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValidationError(
            f"Maglev table size {size} is out of range; use a prime from {MIN_SIZE} to {MAX_SIZE} "
            f"(e.g. {DEFAULT_RING_SIZE} or 655373)"
        )
    if not _is_prime(size):
        raise ValidationError(
            f"Maglev table size {size} is not a prime; use a prime such as {DEFAULT_RING_SIZE} or 655373 "
            "(a composite size lets permutations repeat before covering the table)"
        )
    return size


def _check_weight(weight: object, what: str) -> int:
    # bool is an int subclass, but True as a weight is almost surely a mistake
    if isinstance(weight, (bool, np.bool_)) or not isinstance(weight, (int, np.integer)):
        raise ValidationError(
            f"weight {weight!r} of {what} is not an integer; give a whole number from 0 to {MAX_WEIGHT}"
        )
    weight = int(weight)
    if not 0 <= weight <= MAX_WEIGHT:
        raise ValidationError(
            f"weight {weight} of {what} is out of range; "
            f"give a whole number from 0 to {MAX_WEIGHT} (0 drains the backend)"
        )
    return weight


def _check_positive_count(count: int, size: int) -> None:
    if count > size:
        raise ValidationError(
            f"{count} backends have a positive weight but the Maglev table has only {size} entries; "
            "use a larger table size or fewer backends"
        )


@lru_cache(maxsize=65536)
def _parse_backend(addr: object) -> tuple[str, bytes]:
    """(canonical text, packed bytes) of a backend address; remembered, since the
    same backends come back with every table (a refused address is not)."""
    if not isinstance(addr, str):
        raise ValidationError(
            f"backend address {addr!r} is not a string; give an IPv4 or IPv6 address such as '198.18.2.1'"
        )
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise ValidationError(
            f"backend address {addr!r} is not an IP address; "
            "give an IPv4 or IPv6 address such as '198.18.2.1' or 'fd00:198:18:2::1'"
        ) from None
    if getattr(ip, "scope_id", None):
        raise ValidationError(
            f"backend address {addr!r} has a zone index; give the address without '%{ip.scope_id}'"
        )
    return str(ip), ip.packed


def _canonical_backends(backends: Mapping[str, int]) -> tuple[list[str], list[bytes], list[int]]:
    """Validate a mapping address -> weight; return canonical addresses, keys and weights."""
    if not isinstance(backends, Mapping):
        raise ValidationError(f"backends must be a mapping of address to weight, not {type(backends).__name__}")
    addrs: list[str] = []
    keys: list[bytes] = []
    weights: list[int] = []
    seen: dict[bytes, str] = {}
    for addr, weight in backends.items():
        canonical, key = _parse_backend(addr)
        if key in seen:
            raise ValidationError(
                f"backend address {addr!r} is the same address as {seen[key]!r}; list each backend once"
            )
        seen[key] = addr
        weights.append(_check_weight(weight, f"backend {addr}"))
        addrs.append(canonical)
        keys.append(key)
    return addrs, keys, weights


def _check_keys(keys: Sequence[bytes], weights: Sequence[int]) -> tuple[list[bytes], list[int]]:
    if len(keys) != len(weights):
        raise ValidationError(f"got {len(keys)} keys but {len(weights)} weights; give one weight per key")
    out_keys: list[bytes] = []
    seen: set[bytes] = set()
    for k in keys:
        if not isinstance(k, (bytes, bytearray, memoryview)):
            raise ValidationError(
                f"backend key {k!r} is not bytes; give the packed address (ipaddress.ip_address(a).packed)"
            )
        k = bytes(k)
        if len(k) not in (4, 16):
            raise ValidationError(
                f"backend key {k.hex()} is {len(k)} bytes long; give a packed IPv4 (4 bytes) or IPv6 (16 bytes) address"
            )
        if k in seen:
            raise ValidationError(f"backend key {k.hex()} appears twice; list each backend once")
        seen.add(k)
        out_keys.append(k)
    return out_keys, [_check_weight(w, f"backend key {k.hex()}") for k, w in zip(out_keys, weights)]


# --- shared pieces --------------------------------------------------------------


def permutation_params(key: bytes, size: int) -> tuple[int, int]:
    """(offset, skip) of the backend with this key in a table of `size` entries."""
    size = _check_size(size)
    key = bytes(key)
    return (
        mmh3.hash(key, MAGLEV_SEED_OFFSET, signed=False) % size,
        mmh3.hash(key, MAGLEV_SEED_SKIP, signed=False) % (size - 1) + 1,
    )


def _quotas(weights: list[int], size: int) -> list[int]:
    """Entry count per backend: largest-remainder apportionment of size over weights.

    weights are in the backends' canonical order, which breaks ties between
    equal remainders (first in order first)."""
    total = sum(weights)
    if total == 0:
        return [0] * len(weights)
    quotas = [size * w // total for w in weights]
    left = size - sum(quotas)  # fewer than len(weights)
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(size * weights[i] % total), i))
    for i in by_remainder[:left]:
        quotas[i] += 1
    return quotas


def _prepare(keys: list[bytes], weights: list[int], size: int):
    """Order the live backends; return (positions into keys, offsets, skips, quotas)."""
    live = [i for i, w in enumerate(weights) if w > 0]
    _check_positive_count(len(live), size)
    live.sort(key=lambda i: (len(keys[i]), keys[i]))
    quotas = _quotas([weights[i] for i in live], size)
    params = [_params(keys[i], size) for i in live]
    return live, [p[0] for p in params], [p[1] for p in params], quotas


@lru_cache(maxsize=65536)
def _params(key: bytes, size: int) -> tuple[int, int]:
    """permutation_params without the checks, remembered: a backend's offset and skip
    never change, and every table of its VIP needs them again."""
    return (mmh3.hash(key, MAGLEV_SEED_OFFSET, signed=False) % size,
            mmh3.hash(key, MAGLEV_SEED_SKIP, signed=False) % (size - 1) + 1)


# --- the fill: C through ctypes, or pure Python -------------------------------------

_lib_fill = None  # the C maglev_fill once loaded
_lib_state = "unloaded"  # "unloaded", "loaded" or "missing"
_warned_fallback = False


def _load_lib():
    global _lib_fill, _lib_state
    if _lib_state != "unloaded":
        return _lib_fill
    _lib_state = "missing"
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_maglev_fill{suffix}"
        if not path.is_file():
            continue
        try:
            fn = ctypes.CDLL(str(path)).maglev_fill
        except (OSError, AttributeError) as exc:
            log.debug("Maglev: cannot load %s: %s", path, exc)
            continue
        u32 = np.ctypeslib.ndpointer(np.uint32, flags="C_CONTIGUOUS")
        fn.argtypes = [
            ctypes.c_uint32,
            ctypes.c_uint32,
            u32,
            u32,
            u32,
            np.ctypeslib.ndpointer(np.int32, flags="C_CONTIGUOUS,WRITEABLE"),
            np.ctypeslib.ndpointer(np.uint32, flags="C_CONTIGUOUS,WRITEABLE"),
            np.ctypeslib.ndpointer(np.uint32, flags="C_CONTIGUOUS,WRITEABLE"),
            np.ctypeslib.ndpointer(np.uint32, flags="C_CONTIGUOUS,WRITEABLE"),
        ]
        fn.restype = ctypes.c_int
        _lib_fill, _lib_state = fn, "loaded"
        break
    return _lib_fill


def accelerated() -> bool:
    """True when the compiled fill loop is available."""
    return _load_lib() is not None


def _fill_c(fn, size: int, offsets: list[int], skips: list[int], quotas: list[int]) -> np.ndarray:
    n = len(offsets)
    entry = np.empty(size, dtype=np.int32)
    rc = fn(
        size,
        n,
        np.array(offsets, dtype=np.uint32),
        np.array(skips, dtype=np.uint32),
        np.array(quotas, dtype=np.uint32),
        entry,
        np.empty(max(n, 1), dtype=np.uint32),
        np.empty(max(n, 1), dtype=np.uint32),
        np.empty(max(n, 1), dtype=np.uint32),
    )
    if rc != 0:  # only on input the Python side should have refused
        raise ValidationError(f"Maglev fill refused table size {size}; use a prime from {MIN_SIZE} to {MAX_SIZE}")
    return entry


def _fill_python(size: int, offsets: list[int], skips: list[int], quotas: list[int]) -> np.ndarray:
    """Same loop as the C one: pos[i] is perm_i[next_i], advanced by skip mod size;
    left[i] is what backend i still has to take of its quota."""
    if sum(quotas) > size:  # the C loop refuses this too: the probe would never end
        raise ValidationError(f"Maglev quotas sum to {sum(quotas)}, more than the {size} table entries")
    entry = [-1] * size
    pos = list(offsets)
    left = list(quotas)
    active = [i for i in range(len(offsets)) if left[i] > 0]
    while active:
        for i in active:
            p, s = pos[i], skips[i]
            while entry[p] >= 0:
                p += s
                if p >= size:
                    p -= size
            entry[p] = i
            p += s
            if p >= size:
                p -= size
            pos[i] = p
            left[i] -= 1
        active = [i for i in active if left[i] > 0]
    return np.array(entry, dtype=np.int32)


def _fill(size, offsets, skips, quotas, force_python: bool) -> np.ndarray:
    global _warned_fallback
    fn = None if force_python else _load_lib()
    if fn is not None:
        return _fill_c(fn, size, offsets, skips, quotas)
    if not force_python and not _warned_fallback:
        _warned_fallback = True
        log.warning(
            "Maglev: compiled fill loop l4lb/_maglev_fill not found; using the pure-Python loop "
            "(same tables, about 30x slower). Build it with 'python setup.py build_ext --inplace' or reinstall l4lb."
        )
    return _fill_python(size, offsets, skips, quotas)


def _indices(keys: list[bytes], weights: list[int], size: int, force_python: bool,
             names: list | None = None) -> np.ndarray:
    """Positions into keys per entry (-1 where empty); with `names` (one per key), the
    names instead, as a list (None where empty): one gather instead of two."""
    live, offsets, skips, quotas = _prepare(keys, weights, size)
    entry = _fill(size, offsets, skips, quotas, force_python)
    if names is not None:
        if not live:
            return [None] * size
        return np.array([names[i] for i in live], dtype=object)[entry].tolist()
    if not live:
        return entry  # all -1
    # entry holds positions in the sorted live list; map them to the caller's positions
    return np.asarray(live, dtype=np.int32)[entry]


# --- public API -------------------------------------------------------------------


def maglev_indices(
    keys: Sequence[bytes], weights: Sequence[int], size: int, *, force_python: bool = False
) -> np.ndarray:
    """Maglev table of `size` entries as positions into `keys` (int32; -1 where empty).

    keys are packed addresses (4 or 16 bytes) in any order; the result does not
    depend on that order other than through the positions it returns.
    force_python skips the compiled fill loop (for tests)."""
    size = _check_size(size)
    keys, weights = _check_keys(keys, weights)
    return _indices(keys, weights, size, force_python)


def maglev_table(
    backends: Mapping[str, int], size: int = DEFAULT_RING_SIZE, *, force_python: bool = False
) -> list[str | None]:
    """Maglev table of `size` entries as canonical backend addresses.

    backends maps an IPv4/IPv6 address to a weight from 0 to 65535; weight 0
    drains the backend. Every entry is None when no backend has weight > 0."""
    size = _check_size(size)
    addrs, keys, weights = _canonical_backends(backends)
    # the table is either full or empty: live backends fill every entry
    return _indices(keys, weights, size, force_python, names=addrs)


def reference_table(keys: Sequence[bytes], weights: Sequence[int], size: int) -> list[int]:
    """Plain transcription of the paper's Algorithm 1, each backend stopping at its quota.

    Returns positions into `keys` (-1 where empty). Slow; the tests use it to
    check the fast path entry for entry."""
    size = _check_size(size)
    keys, weights = _check_keys(keys, weights)
    M = size

    # Backends taken part, in canonical order.
    order = sorted((i for i in range(len(keys)) if weights[i] > 0), key=lambda i: (len(keys[i]), keys[i]))
    _check_positive_count(len(order), M)
    entry = [-1] * M
    if not order:
        return entry
    N = len(order)

    # Quotas: the exact shares M * w / W rounded down, then one more entry each for
    # the largest fractional parts (first in order on a tie) until the quotas sum to M.
    share = [Fraction(M * weights[i], sum(weights)) for i in order]
    quota = [math.floor(x) for x in share]
    extra = sorted(range(N), key=lambda i: (quota[i] - share[i], i))
    for i in extra[: M - sum(quota)]:
        quota[i] = quota[i] + 1

    offset = [0] * N
    skip = [0] * N
    for i in range(N):
        offset[i], skip[i] = permutation_params(keys[order[i]], M)

    def permutation(i: int, j: int) -> int:
        return (offset[i] + j * skip[i]) % M

    next_ = [0] * N
    taken = [0] * N
    n = 0
    while True:
        for i in range(N):
            if taken[i] == quota[i]:
                continue
            c = permutation(i, next_[i])
            while entry[c] >= 0:
                next_[i] = next_[i] + 1
                c = permutation(i, next_[i])
            entry[c] = order[i]
            next_[i] = next_[i] + 1
            taken[i] = taken[i] + 1
            n = n + 1
            if n == M:
                return entry


def entry_counts(table: Iterable[Hashable]) -> dict:
    """How many entries each backend holds (None / -1 entries are left out)."""
    if isinstance(table, np.ndarray):
        values, counts = np.unique(table, return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts) if v >= 0}
    return {k: c for k, c in Counter(table).items() if k is not None and k != -1}
