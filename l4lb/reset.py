"""Bringing a loaded balancer's maps back to empty (tests, replay)."""
from __future__ import annotations

from . import consts
from .dataplane import Dataplane


def clear_maps(dp: Dataplane) -> None:
    for name in (consts.MAP_VIPS, consts.MAP_VIP_ADDRS, consts.MAP_CONNTRACK, consts.MAP_CONNTRACK6):
        dp.t[name].clear()
    backends = dp.t[consts.MAP_BACKENDS]
    zero = backends.Leaf()
    for i in range(dp.capacity.max_backends + 1):
        backends[backends.Key(i)] = zero
    info = dp.t[consts.MAP_VIP_INFO]
    for i in range(dp.capacity.max_vips):
        info[info.Key(i)] = info.Leaf()
    dp.vip_addresses.clear()
    dp.write_filter([])
    for name in (consts.MAP_VIP_STATS, consts.MAP_GLOBAL_STATS):
        t = dp.t[name]
        for i in range(t.max_entries):
            dp._zero_percpu(t, i)
    cs = dp.prog.table(consts.MAP_CPU_STATE)
    dp._zero_percpu(cs, 0)
