"""gRPC service boundary: validate the request, call the Controller, turn
typed errors into status codes. No load-balancing logic lives here."""
from __future__ import annotations

import functools
import threading
import time

import grpc

from l4lb.announce import vip_digests
from l4lb.config import check_capacity, parse_config_text
from l4lb.controller import Controller, describe_step
from l4lb.health import VipGone, parse_health
from l4lb.errors import (AlreadyExistsError, BpfError, CapacityError, L4lbError, NotFoundError,
                         StateError, ValidationError)
from l4lb.model import VipKey

from .l4lb.v1 import l4lb_pb2 as pb
from .l4lb.v1 import l4lb_pb2_grpc as pb_grpc

STATUS = [
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StateError, grpc.StatusCode.FAILED_PRECONDITION),
    (BpfError, grpc.StatusCode.INTERNAL),
]


def _status(err: L4lbError) -> grpc.StatusCode:
    for cls, code in STATUS:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.INTERNAL


MAX_DETAILS = 1000  # characters of a status message (a trailer: it must stay small)


def details(err: L4lbError) -> str:
    text = str(err)
    return text if len(text) <= MAX_DETAILS else text[:MAX_DETAILS] + "…"


def rpc(fn):
    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except L4lbError as e:
            context.abort(_status(e), details(e))
    return wrapper


def vip_key(vid, what: str = "id") -> VipKey:
    if vid is None or not vid.address:
        raise ValidationError(f"{what}: give the VIP's address, port and protocol")
    return VipKey.parse(vid.address, vid.port, vid.protocol, what)


def health_msg(check) -> pb.HealthCheck:
    return pb.HealthCheck(kind=check.kind, port=check.port, interval=check.interval, timeout=check.timeout,
                          rise=check.rise, fall=check.fall, path=check.path, host=check.host,
                          expect=list(check.expect), via=check.via, min_healthy=check.min_healthy)


def health_from_msg(m: pb.HealthCheck, what: str = "health"):
    """The request's check in the form the YAML takes (one validator for both)."""
    if m.kind == "none":
        return None
    doc = {"kind": m.kind or "tcp"}
    for name in ("port", "interval", "timeout", "rise", "fall", "min_healthy"):
        if getattr(m, name):
            doc[name] = getattr(m, name)
    for name in ("path", "host", "via"):
        if getattr(m, name):
            doc[name] = getattr(m, name)
    if m.expect:
        doc["expect"] = list(m.expect)
    return parse_health(doc, what)


def vip_msg(v, stats: dict | None = None, probes: dict | None = None) -> pb.Vip:
    weights, panic = v.effective()
    msg = pb.Vip(id=pb.VipId(address=v.key.address, port=v.key.port, protocol=v.key.protocol),
                 flags=sorted(v.flags), vip_id=v.vip_id, panic=panic, encap=v.encap)
    add = msg.backends.add
    counts = (stats or {}).get("backends", {})
    if not v.health:
        for a, w in sorted(v.backends.items()):
            add(address=a, weight=w, effective_weight=weights[a], **counts.get(a, {}))
    for a, w in sorted(v.backends.items()) if v.health else ():
        b = add(address=a, weight=w, effective_weight=weights[a], health="down" if a in v.down else "up",
                **counts.get(a, {}))
        last = (probes or {}).get(a)
        if last:
            b.last_result, b.latency_seconds, b.since = last
    if v.health:
        msg.health.CopyFrom(health_msg(v.health))
    if stats:
        msg.packets, msg.bytes, msg.new_flows = stats["packets"], stats["bytes"], stats["new_flows"]
    return msg


MAX_CONFIG_BYTES = 4 << 20
MAX_QUEUED_EVENTS = 10000  # transitions a WatchHealth client may fall behind by before its stream ends


def event_msg(e) -> pb.HealthEvent:
    return pb.HealthEvent(id=pb.VipId(address=e.vip.address, port=e.vip.port, protocol=e.vip.protocol),
                          backend=e.backend, old_state=e.old, new_state=e.new, reason=e.reason, time=e.time,
                          panic=e.panic, snapshot=e.snapshot)


class _Feed:
    """One WatchHealth stream's queue: put() by the controller (never
    blocks), take() by the stream's thread; set() ends the wait for good (the
    call ended, or the server stops)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.items: list = []
        self.ended = False
        self.overflowed = False
        self.cv = threading.Condition()

    def put(self, item) -> None:
        with self.cv:
            if len(self.items) >= self.limit:
                self.overflowed = self.ended = True
            else:
                self.items.append(item)
            self.cv.notify()

    def set(self) -> None:
        with self.cv:
            self.ended = True
            self.cv.notify()

    def take(self) -> list | None:
        """What came since the last take, waiting for something; None once ended."""
        with self.cv:
            while not (self.items or self.ended):
                self.cv.wait()
            if self.ended:
                return None
            items, self.items = self.items, []
            return items


class LoadBalancerServicer(pb_grpc.LoadBalancerServicer):
    def __init__(self, ctrl: Controller, resolve_neighbour=None, lookup_flow=None, announcer=None):
        self.ctrl = ctrl
        self.announcer = announcer  # l4lb.announce.Announcer with `l4lb run --announce`
        self.resolve_neighbour = resolve_neighbour
        self.lookup_flow = lookup_flow
        self.stopping = threading.Event()
        self._wakers: set[threading.Event] = set()
        self._wakers_lock = threading.Lock()

    def stop_streams(self) -> None:
        """Ends every stream now (UNAVAILABLE) and refuses new ones: the
        server is stopping."""
        self.stopping.set()
        with self._wakers_lock:
            for wake in self._wakers:
                wake.set()

    @rpc
    def AddVip(self, request, context):
        key = vip_key(request.id if request.HasField("id") else None)
        v = self.ctrl.add_vip(key, list(request.flags), [(b.address, b.weight) for b in request.backends],
                              request.encap)
        return vip_msg(v)

    @rpc
    def DeleteVip(self, request, context):
        self.ctrl.delete_vip(vip_key(request.id if request.HasField("id") else None))
        return pb.DeleteVipResponse()

    @rpc
    def ListVips(self, request, context):
        return pb.ListVipsResponse(vips=[vip_msg(v) for v in self.ctrl.list_vips()])

    @rpc
    def GetVip(self, request, context):
        key = vip_key(request.id if request.HasField("id") else None)
        _, per_vip = self.ctrl.stats(key)
        v, st = per_vip[0]
        return vip_msg(v, st, self.ctrl.health_details(key))

    @rpc
    def ModifyVip(self, request, context):
        key = vip_key(request.id if request.HasField("id") else None)
        return vip_msg(self.ctrl.modify_vip(key, list(request.flags), request.encap))

    @rpc
    def AddBackends(self, request, context):
        key = vip_key(request.id if request.HasField("id") else None)
        return vip_msg(self.ctrl.add_backends(key, [(b.address, b.weight) for b in request.backends]))

    @rpc
    def RemoveBackends(self, request, context):
        key = vip_key(request.id if request.HasField("id") else None)
        return vip_msg(self.ctrl.remove_backends(key, list(request.addresses)))

    @rpc
    def SetBackendWeights(self, request, context):
        key = vip_key(request.id if request.HasField("id") else None)
        return vip_msg(self.ctrl.set_weights(key, [(b.address, b.weight) for b in request.backends]))

    def _stats(self, request) -> pb.Stats:
        key = vip_key(request.id) if request.HasField("id") else None
        glob, per_vip = self.ctrl.stats(key)
        return pb.Stats(counters=glob, timestamp=time.time(), vips=[
            pb.VipStats(id=pb.VipId(address=v.key.address, port=v.key.port, protocol=v.key.protocol),
                        packets=s["packets"], bytes=s["bytes"], new_flows=s["new_flows"],
                        backends=[pb.Backend(address=a, weight=v.backends[a], **c)
                                  for a, c in s["backends"].items()])
            for v, s in per_vip])

    @rpc
    def GetStats(self, request, context):
        return self._stats(request)

    def WatchStats(self, request, context):
        """Stats every interval until the client goes or the server stops:
        the wait between two messages ends at once on either."""
        interval = request.interval_seconds or 1.0
        if not 0.1 <= interval <= 3600:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"interval_seconds: {interval} is out of range (0.1-3600)")
        wake = threading.Event()
        context.add_callback(wake.set)  # the call ended: cancelled, deadline, client gone
        with self._wakers_lock:
            self._wakers.add(wake)
        try:
            while not (wake.is_set() or self.stopping.is_set()):
                yield self._stats(request)
                wake.wait(interval)
        except L4lbError as e:
            context.abort(_status(e), details(e))
        finally:
            with self._wakers_lock:
                self._wakers.discard(wake)
        if self.stopping.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is stopping; reconnect when it is back")

    def WatchHealth(self, request, context):
        """Health transitions as they are committed until the client goes or
        the server stops (or, for one VIP's, the VIP is deleted: NOT_FOUND);
        with snapshot, every checked backend's state first."""
        feed = _Feed(MAX_QUEUED_EVENTS)
        gone = False
        listen = feed.put  # one bound method: unwatch_health finds it by identity
        context.add_callback(feed.set)  # the call ended: cancelled, deadline, client gone
        with self._wakers_lock:
            self._wakers.add(feed)
        try:
            if self.stopping.is_set():
                feed.set()
            else:
                try:
                    key = vip_key(request.id) if request.HasField("id") else None
                    first = self.ctrl.watch_health(key, listen, request.snapshot)
                except L4lbError as e:
                    context.abort(_status(e), details(e))
                try:
                    context.send_initial_metadata(())  # the client can tell that the stream is open
                    for event in first:
                        yield event_msg(event)
                    while not gone and (events := feed.take()) is not None:
                        for event in events:
                            if not isinstance(event, VipGone):
                                yield event_msg(event)
                            elif key is not None:
                                gone = True  # a watch of one VIP ends with it
                                break
                finally:
                    self.ctrl.unwatch_health(listen)
        finally:
            with self._wakers_lock:
                self._wakers.discard(feed)
        if gone:
            context.abort(grpc.StatusCode.NOT_FOUND, f"VIP {key} was deleted")
        if self.stopping.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is stopping; reconnect when it is back")
        if feed.overflowed:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"the client fell {MAX_QUEUED_EVENTS} transitions behind; "
                          "reconnect (with snapshot) to resync")

    @rpc
    def SetGateway(self, request, context):
        which = request.WhichOneof("target")
        if which == "mac":
            self.ctrl.set_gateway(request.mac)
        elif which == "ip":
            if not self.resolve_neighbour:
                raise ValidationError("ip: resolving a gateway needs `l4lb run --interface`; give the MAC instead")
            self.ctrl.set_gateway(self.resolve_neighbour(request.ip), request.ip)
        else:
            raise ValidationError("give the gateway's mac or its ip")
        return pb.Gateway(mac=self.ctrl.runtime.gateway_mac, ip=self.ctrl.gateway_ip)

    @rpc
    def GetGateway(self, request, context):
        return pb.Gateway(mac=self.ctrl.runtime.gateway_mac, ip=self.ctrl.gateway_ip)

    @rpc
    def GetStatus(self, request, context):
        s = self.ctrl.status()
        cap = self.ctrl.capacity
        ann = self.announcer
        digests = [pb.VipDigest(id=pb.VipId(address=k.address, port=k.port, protocol=k.protocol), ring=r, backends=b)
                   for k, r, b in vip_digests(self.ctrl)]
        panic = [str(v.key) for v in self.ctrl.list_vips() if v.effective()[1]]
        return pb.Status(announce_table=ann.table if ann else 0, drained=bool(ann and ann.drained),
                         announced=ann.announced() if ann else [], digests=digests, panic=panic,
                         interface=s["interface"], attach_mode=s["attach_mode"],
                         interfaces=s["interfaces"], next_hop=s["next_hop"],
                         program_id=s["program_id"], vips=s["vips"], backends=s["backends"],
                         uptime_seconds=s["uptime"], conntrack_used=s["conntrack_used"],
                         capacity=pb.Capacity(max_vips=cap.max_vips, max_backends=cap.max_backends,
                                              conntrack_entries=cap.ct_size, ring_size=cap.ring_size,
                                              kernel_bytes=s["kernel_bytes"]))

    @rpc
    def LookupFlow(self, request, context):
        if not self.lookup_flow:
            raise ValidationError("flow lookup is not available on this server")
        verdict, backend, from_ct = self.lookup_flow(request.src, request.dst, request.sport,
                                                     request.dport, request.protocol)
        key, hashed_on = self.ctrl.vip_of_flow(request.dst, request.dport, request.protocol)
        return pb.LookupFlowResponse(verdict=verdict, backend=backend, from_conntrack=from_ct,
                                     vip=str(key) if key else "", hashed_on=hashed_on)

    @rpc
    def ListFlows(self, request, context):
        key = vip_key(request.id if request.HasField("id") else None)
        if request.limit > 100000:
            raise ValidationError(f"limit: {request.limit} is too large (at most 100000)")
        flows, total = self.ctrl.list_flows(key, request.limit or 1000)
        return pb.ListFlowsResponse(flows=[pb.Flow(**f) for f in flows], total=total)

    @rpc
    def SetHealthCheck(self, request, context):
        key = vip_key(request.id if request.HasField("id") else None)
        check = health_from_msg(request.health) if request.HasField("health") else None
        return vip_msg(self.ctrl.set_health_check(key, check))

    @rpc
    def Apply(self, request, context):
        if len(request.config_yaml) > MAX_CONFIG_BYTES:
            raise ValidationError(f"config_yaml: {len(request.config_yaml)} bytes, at most {MAX_CONFIG_BYTES}")
        cfg = parse_config_text(request.config_yaml, "config")
        check_capacity(cfg, self.ctrl.capacity)
        steps = self.ctrl.apply(cfg, runtime=True, dry_run=request.dry_run)
        return pb.ApplyResponse(changes=[describe_step(kind, obj) for kind, obj in steps])

    def Capture(self, request, context):
        """Copies of the selected packets until the count, the duration, the
        client or the server's stop; the last message (end) holds the counts."""
        from l4lb.capture import CaptureRun, Selection  # noqa: PLC0415

        try:
            key = vip_key(request.vip, "vip") if request.HasField("vip") else None
            run = CaptureRun(self.ctrl, Selection(key, request.backend, tuple(request.verdicts), request.count,
                                                  request.duration_seconds, request.snaplen),
                             active=lambda: context.is_active() and not self.stopping.is_set())
            for c in run:
                msg = pb.CapturedPacket(timestamp_ns=c.timestamp_ns, sent=c.sent, verdict=c.verdict,
                                        backend=c.backend, length=c.length, data=c.data, cpu=c.cpu, seq=c.seq,
                                        lost=run.lost, packets=run.packets)
                if c.vip is not None:
                    msg.vip.CopyFrom(pb.VipId(address=c.vip.address, port=c.vip.port, protocol=c.vip.protocol))
                yield msg
            yield pb.CapturedPacket(end=True, lost=run.lost, packets=run.packets)
        except L4lbError as e:
            context.abort(_status(e), details(e))

    @rpc
    def FlushFlows(self, request, context):
        key = vip_key(request.id if request.HasField("id") else None)
        return pb.FlushFlowsResponse(flushed=self.ctrl.flush_flows(key))

    @rpc
    def SetDrain(self, request, context):
        if self.announcer is None:
            raise StateError("this node announces no VIPs (start `l4lb run` with --announce); "
                             "there is nothing to drain")
        announced = self.announcer.set_drained(request.drained)
        return pb.NodeState(announce_table=self.announcer.table, drained=self.announcer.drained, announced=announced)
