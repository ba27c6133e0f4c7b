"""A live capture at the XDP hook, as `l4lb run` drives it for `l4lb capture`:
the selection written to capture_cfg, lb_config.capture set, copies read from
the pinned ring buffer until enough packets, the time or the client says
stop, then capture off. One capture at a time. Forwarding never waits for
the reader: a ring that fills drops copies, and `lost` counts them."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from . import consts
from .errors import NotFoundError, StateError, ValidationError
from .model import VipKey, parse_address

VERDICT_NAMES = {v: k for k, v in consts.CAPTURE_VERDICTS.items()}
MAX_DURATION_S = 86400.0
MAX_COUNT = 1_000_000_000
POLL_MS = 100

_one_at_a_time = threading.Lock()


@dataclass
class Copy:
    timestamp_ns: int  # unix time
    sent: bool  # False: as received; True: as sent
    verdict: str  # tx, pass, drop
    vip: VipKey | None
    backend: str
    length: int  # the frame's length
    data: bytes  # its first snaplen bytes
    cpu: int
    seq: int


@dataclass
class Selection:
    vip: VipKey | None = None
    backend: str = ""
    verdicts: tuple[str, ...] = ()
    count: int = 0
    duration_s: float = 0.0
    snaplen: int = 0


def check_selection(sel: Selection) -> Selection:
    """The selection with its defaults, or a ValidationError naming the bad value."""
    bad = [v for v in sel.verdicts if v not in consts.CAPTURE_VERDICTS]
    if bad:
        raise ValidationError(f"verdict {bad[0][:64]!r}: use tx, pass or drop")
    if not 0 <= sel.count <= MAX_COUNT:
        raise ValidationError(f"count: {sel.count} is out of range (0-{MAX_COUNT}; 0: no limit)")
    if not (0 <= sel.duration_s <= MAX_DURATION_S) or sel.duration_s != sel.duration_s:
        raise ValidationError(f"duration: {sel.duration_s} is out of range (0-{MAX_DURATION_S:g} s; 0: no limit)")
    if not 0 <= sel.snaplen <= consts.CAPTURE_SNAP_MAX:
        raise ValidationError(f"snaplen: {sel.snaplen} is out of range (1-{consts.CAPTURE_SNAP_MAX}; 0: the most)")
    backend = str(parse_address(sel.backend, "backend")) if sel.backend else ""
    return Selection(sel.vip, backend, tuple(dict.fromkeys(sel.verdicts)) or tuple(consts.CAPTURE_VERDICTS),
                     sel.count, sel.duration_s, sel.snaplen or consts.CAPTURE_SNAP_MAX)


class CaptureRun:
    """Iterating yields the copies; afterwards `packets` and `lost` hold the
    counts (a forwarded packet's two copies are one packet)."""

    def __init__(self, ctrl, sel: Selection, active: Callable[[], bool] = lambda: True):
        self.ctrl = ctrl
        self.sel = check_selection(sel)
        self.active = active
        self.packets = 0
        self.lost = 0
        with ctrl.lock:  # who holds which id and index now
            model = ctrl.model
            if self.sel.vip is not None:
                vip = model.get(self.sel.vip)
                if self.sel.backend and self.sel.backend not in vip.backends:
                    raise NotFoundError(f"backend {self.sel.backend} is not on VIP {self.sel.vip}")
            if self.sel.backend and self.sel.backend not in model.backends:
                raise NotFoundError(f"backend {self.sel.backend} is on no VIP")
            self.vip_of = {v.vip_id + 1: k for k, v in model.vips.items()}
            self.address_of = {b.index: a for a, b in model.backends.items()}
            self.vip_filter = model.vips[self.sel.vip].vip_id + 1 if self.sel.vip is not None else 0
            self.backend_filter = model.backends[self.sel.backend].index if self.sel.backend else 0

    def __iter__(self) -> Iterator[Copy]:
        if not _one_at_a_time.acquire(blocking=False):
            raise StateError("a capture is running already (one at a time); stop it first")
        dp = self.ctrl.dp
        records: list = []
        reader = None
        try:
            reader = dp.capture_reader(records.append)
            reader.consume()  # what an earlier capture left unread
            records.clear()
            before = dp.capture_counts()["lost"]
            mask = sum(1 << consts.CAPTURE_VERDICTS[v] for v in self.sel.verdicts)
            with self.ctrl.lock:
                dp.capture_start(self.vip_filter, self.backend_filter, mask, self.sel.snaplen)
            offset = time.time_ns() - time.monotonic_ns()  # bpf_ktime_get_ns is CLOCK_MONOTONIC
            deadline = time.monotonic() + self.sel.duration_s if self.sel.duration_s else None
            try:
                while self.active() and not self._done(deadline):
                    reader.poll(POLL_MS)
                    batch, records[:] = list(records), []
                    for r in batch:
                        if self.sel.count and self.packets >= self.sel.count:
                            break
                        if r.sent or r.verdict != consts.CAPTURE_VERDICTS["tx"]:
                            self.packets += 1  # a received copy of a forwarded packet waits for its sent one
                        yield self._copy(r, offset)
                    self.lost = dp.capture_counts()["lost"] - before
            finally:
                with self.ctrl.lock:
                    dp.capture_stop()
                self.lost = dp.capture_counts()["lost"] - before
        finally:
            if reader is not None:
                reader.close()
            _one_at_a_time.release()

    def _done(self, deadline) -> bool:
        if self.sel.count and self.packets >= self.sel.count:
            return True
        return deadline is not None and time.monotonic() >= deadline

    def _copy(self, r, offset: int) -> Copy:
        return Copy(timestamp_ns=int(r.ts) + offset, sent=bool(r.sent), verdict=VERDICT_NAMES.get(int(r.verdict), "?"),
                    vip=self.vip_of.get(int(r.vip)), backend=self.address_of.get(int(r.backend), ""),
                    length=int(r.len), data=bytes(r.data[:r.cap_len]), cpu=int(r.cpu), seq=int(r.seq))
