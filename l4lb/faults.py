"""Named points on the paths that must survive a crash (persisting the state,
writing the maps). With L4LB_CRASH_AT=<point>[:<n>] in the environment the
process kills itself with SIGKILL the n-th time (default: the first) it
reaches that point: the crash tests use it to stop `l4lb run` between any two
steps. Without the variable a point costs one dictionary lookup."""
from __future__ import annotations

import os
import signal

_name, _, _count = os.environ.get("L4LB_CRASH_AT", "").partition(":")
_left = int(_count) if _count.isdigit() else 1
POINTS = ("persist.written", "persist.renamed", "sync.vips-removed", "sync.generations",
          "sync.backends-added", "sync.ring-written", "sync.vip-written", "sync.rings-flipped",
          "sync.addresses", "sync.done")


def arm(name: str, count: int = 1) -> None:
    """Sets the point (as L4LB_CRASH_AT would) in a process already running."""
    global _name, _left
    _name, _left = name, count


def point(name: str) -> None:
    global _left
    if _name and name == _name:
        _left -= 1
        if _left <= 0:
            os.kill(os.getpid(), signal.SIGKILL)
