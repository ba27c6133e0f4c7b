"""`l4lb apply -f` and `l4lb run --config`: the difference between a
configuration and the running state, applied VIP by VIP."""
from __future__ import annotations

from l4lb.config import LbConfig


def plan(current: dict, cfg: LbConfig) -> list[tuple[str, object]]:
    """current: {VipKey: (flags, {addr: weight})}. Returns the steps in order."""
    want = {v.key: v for v in cfg.vips}
    steps: list[tuple[str, object]] = []
    for key in current:
        if key not in want:
            steps.append(("delete", key))
    for key, spec in want.items():
        if key not in current:
            steps.append(("add", spec))
            continue
        flags, backends = current[key]
        if set(flags) != set(spec.flags):
            steps.append(("flags", spec))
        if backends != spec.backends:
            steps.append(("backends", spec))
    return steps


def apply_config(ctrl, cfg: LbConfig) -> list[tuple[str, object]]:
    current = {k: (v.flags, dict(v.backends)) for k, v in ctrl.state.vips.items()}
    steps = plan(current, cfg)
    for kind, obj in steps:
        if kind == "delete":
            ctrl.delete_vip(obj)
        elif kind == "add":
            ctrl.add_vip(obj.key, obj.flags, list(obj.backends.items()))
        elif kind == "flags":
            ctrl.modify_vip(obj.key, obj.flags)
        elif kind == "backends":
            with ctrl.lock:
                ctrl.state.set_backends(obj.key, dict(obj.backends))
                ctrl.save()
    return steps
