"""Health checks of a running balancer: the prober (l4lb/probe.py) probes the
backends of every VIP that has a check, and each transition it reports
becomes a change of the controller (the backend leaves or rejoins the ring,
unless the VIP is in panic).

Targets follow the controller: after every commit they are rebuilt, and the
prober keeps the state of those that stay. A tunnel probe is addressed to the
VIP with a socket mark naming the backend's index; the tc program
(xdp/probe_encap.c) on the LB's interface encapsulates it towards that
backend. A probe starts from the state the saved model has (up unless found
down before), so a restarted control plane invents no transition."""
from __future__ import annotations

import logging
import queue
import threading
import time

from .controller import Controller
from .model import VipKey
from .probe import Prober, Target, probe_mark

log = logging.getLogger("l4lb.health")


def targets(ctrl: Controller) -> list[Target]:
    out = []
    with ctrl.lock:
        model = ctrl.model
        for key, vip in model.vips.items():
            check = vip.health
            if check is None:
                continue
            port = check.port or key.port
            for addr in vip.backends:
                tunnel = check.via == "tunnel"
                out.append(Target(
                    key=(key, addr), address=key.address if tunnel else addr, port=port, kind=check.kind,
                    mark=probe_mark(model.backends[addr].index, vip.encap == "gue") if tunnel else 0,
                    interval=check.interval, timeout=check.timeout, rise=check.rise, fall=check.fall,
                    http_path=check.path, http_host=check.host or None, http_codes=frozenset(check.expect),
                    initial="down" if addr in vip.down else "up"))
    return out


class HealthChecker:
    """Owns the prober; transitions are applied by a thread of its own so that
    the prober's loop never waits for a commit."""

    def __init__(self, ctrl: Controller, ensure_tunnel=None):
        """ensure_tunnel(): called before the first tunnel probe (loads and
        attaches the tc program that carries them)."""
        self.ctrl = ctrl
        self.ensure_tunnel = ensure_tunnel
        self._events: queue.Queue = queue.Queue()
        self.prober = Prober(self._on_transition)
        self._worker = threading.Thread(target=self._apply, name="l4lb-health", daemon=True)
        self._worker.start()
        ctrl.on_commit.append(self.refresh)
        self.refresh()

    def refresh(self) -> None:
        want = targets(self.ctrl)
        if self.ensure_tunnel and any(t.mark for t in want):
            self.ensure_tunnel()
        self.prober.set_targets(want)

    def _on_transition(self, key: tuple[VipKey, str], up: bool, reason: str, latency_s: float) -> None:
        self._events.put((key, up, reason, time.time()))

    def _apply(self) -> None:
        while True:
            item = self._events.get()
            if item is None:
                return
            (vip, addr), up, reason, at = item
            try:
                self.ctrl.report_health(vip, addr, up, reason, at)
            except Exception as e:  # a failed commit: the next transition or start retries
                log.error("health: cannot apply %s %s -> %s: %s", vip, addr, "up" if up else "down", e)

    def details(self, key: VipKey) -> dict[str, tuple[str, float, float]]:
        """{backend: (last result, latency in s, unix time of the last transition)}."""
        out = {}
        for (vip, addr), st in self.prober.results().items():
            if vip == key:
                out[addr] = (st.reason, st.latency_s or 0.0, st.since or 0.0)
        return out

    def stop(self) -> None:
        if self.refresh in self.ctrl.on_commit:
            self.ctrl.on_commit.remove(self.refresh)
        self.prober.stop()
        self._events.put(None)
