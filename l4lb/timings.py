"""Durations of control-plane work (a ring's Maglev build, its push into the
kernel) handed to whoever listens: the metrics exporter turns them into
histograms. Nothing is kept when nobody listens."""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager

RING_BUILD = "ring_build"  # one VIP's Maglev table computed
RING_PUSH = "ring_push"  # one ring copy written into the kernel (one syscall)

_listeners: dict[str, list[Callable[[float], None]]] = {}


def listen(name: str, fn: Callable[[float], None]) -> None:
    _listeners.setdefault(name, []).append(fn)


def unlisten(name: str, fn: Callable[[float], None]) -> None:
    if fn in _listeners.get(name, ()):
        _listeners[name].remove(fn)


@contextmanager
def timed(name: str):
    """Times the block for the listeners of `name` (when it completes)."""
    if not _listeners.get(name):
        yield
        return
    t0 = time.perf_counter()
    yield
    dt = time.perf_counter() - t0
    for fn in list(_listeners.get(name, ())):
        fn(dt)
