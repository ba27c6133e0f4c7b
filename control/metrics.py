"""The Prometheus endpoint of `l4lb run` (--metrics-listen): /metrics served
by prometheus_client from a collector that reads the pinned maps at scrape
time, summed over CPUs, so the data plane's counters never go backwards
across a restart of the control plane (the maps outlive it). Process-local
figures (gRPC requests, ring builds and pushes) are histograms kept by this
process and start anew with it, as any process's metrics do.

Label cardinality is bounded by the capacity (README.md, "Metrics"): per VIP
a few series, per backend address a few, and per (VIP, backend) listing a few
gauges, up to --metrics-max-pairs listings."""
from __future__ import annotations

import ipaddress
import logging
import platform
import threading
from importlib import metadata
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from l4lb import bpf, consts, timings
from l4lb.errors import ValidationError, shown

log = logging.getLogger("l4lb.metrics")

ALLOW_REMOTE_FLAG = "--metrics-allow-remote"
DEFAULT_MAX_PAIRS = 20000  # (VIP, backend) listings exported with their own gauges

# global_stats field -> (verdict, reason) of l4lb_packets_total: every packet
# the program sees ends in exactly one of these (docs/dataplane.md)
VERDICTS = {
    "pass": ("pass", "not_vip"),
    "tx": ("tx", "forwarded"),
    "too_big": ("tx", "icmp_too_big"),
    "icmp_echo": ("tx", "icmp_echo"),
    "no_backend": ("drop", "no_backend"),
    "icmp_limited": ("drop", "icmp_rate_limited"),
    "fragment": ("drop", "fragment"),
    "ext_header": ("drop", "ipv6_extension_header"),
    "malformed": ("drop", "malformed"),
    "error": ("drop", "error"),
    "fib_no_neigh": ("pass", "fib_no_neighbour"),
    "fib_drop": ("drop", "fib_no_route"),
}
# global_stats field -> event of l4lb_conntrack_events_total
CT_EVENTS = {"ct_hit": "hit", "ct_miss": "miss", "ct_stale": "stale", "ct_insert": "insert",
             "ct_limited": "rate_limited", "ct_evict": "evict", "ct_busy": "busy",
             "ct_promote": "promote", "ct_syn_evict": "syn_evict"}
FAMILIES = {consts.FAMILY_V4: "ipv4", consts.FAMILY_V6: "ipv6"}

RING_BUILD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
RING_PUSH_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.1)
GRPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


def vip_label(key) -> str:
    """A VIP as the CLI writes it: 198.18.10.10:80/tcp, [fd00:198:18:10::10]:80/tcp."""
    host = f"[{key.address}]" if ":" in key.address else key.address
    return f"{host}:{key.port}/{key.protocol}"


def parse_metrics_listen(text: str, allow_remote: bool) -> tuple[str, int]:
    """ADDRESS:PORT of the metrics endpoint: loopback unless allow_remote."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ValidationError(f"--metrics-listen {shown(text)}: use ADDRESS:PORT (e.g. 127.0.0.1:9750)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValidationError(f"--metrics-listen {shown(text)}: {shown(host)} is not an IP address") from None
    if not ip.is_loopback and not allow_remote:
        raise ValidationError(f"--metrics-listen {text}: {ip} is not a loopback address; the metrics name every "
                              f"VIP and backend, so serving them beyond this host needs {ALLOW_REMOTE_FLAG}")
    return str(ip), int(port)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - one line per scrape is noise
        pass


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class LbCollector(Collector):
    """Every data-plane figure, read from the maps when Prometheus scrapes."""

    def __init__(self, ctrl, prog=None, max_pairs: int = DEFAULT_MAX_PAIRS):
        self.ctrl = ctrl
        self.prog = prog
        self.max_pairs = max_pairs
        self.build = {"version": _version(), "bcc": bpf.bcc_version(), "kernel": platform.release(),
                      "program_tag": _program_tag(prog)}

    def describe(self):
        return []  # read the maps at scrape time only, never at registration

    def collect(self):
        snap = self.ctrl.snapshot()
        yield from self._build_info()
        yield from self._globals(snap.globals)
        yield from self._vips(snap)
        yield from self._backends(snap)
        yield from self._conntrack()
        yield from self._capture()

    def _build_info(self):
        g = GaugeMetricFamily("l4lb_build_info", "Build of the running l4lb: always 1",
                              labels=list(self.build))
        g.add_metric(list(self.build.values()), 1)
        yield g

    def _globals(self, glob: dict[str, int]):
        verdicts = CounterMetricFamily("l4lb_packets", "Packets the XDP program handled, by verdict "
                                       "and reason (docs/dataplane.md)", labels=["verdict", "reason"])
        ct = CounterMetricFamily("l4lb_conntrack_events", "Connection-table events", labels=["event"])
        other = CounterMetricFamily("l4lb_dataplane_events", "Other data-plane counters (global_stats)",
                                    labels=["counter"])
        for name, value in glob.items():
            if name in VERDICTS:
                verdicts.add_metric(list(VERDICTS[name]), value)
            elif name in CT_EVENTS:
                ct.add_metric([CT_EVENTS[name]], value)
            else:
                other.add_metric([name], value)
        yield verdicts
        yield ct
        yield other

    def _vips(self, snap):
        packets = CounterMetricFamily("l4lb_vip_packets", "Packets to a VIP", labels=["vip"])
        nbytes = CounterMetricFamily("l4lb_vip_bytes", "Bytes of the packets to a VIP, as received",
                                     labels=["vip"])
        flows = CounterMetricFamily("l4lb_vip_new_flows", "New flows of a VIP (connection-table entries "
                                    "made, or refused by the new-flow rate limit)", labels=["vip"])
        backends = GaugeMetricFamily("l4lb_vip_backends", "Backends a VIP lists, by state "
                                     "(serving: effective weight > 0)", labels=["vip", "state"])
        panic = GaugeMetricFamily("l4lb_vip_panic", "1 while too few backends are up and health is "
                                  "ignored", labels=["vip"])
        checked = GaugeMetricFamily("l4lb_vip_health_checked", "1 when the VIP has a health check",
                                    labels=["vip"])
        vips = GaugeMetricFamily("l4lb_vips", "VIPs configured")
        vips.add_metric([], len(snap.vips))
        cap = GaugeMetricFamily("l4lb_vips_capacity", "VIPs the program was built for")
        cap.add_metric([], self.ctrl.capacity.max_vips)
        for v in snap.vips:
            label = vip_label(v.key)
            c = snap.vip_counters(v)
            packets.add_metric([label], c["packets"])
            nbytes.add_metric([label], c["bytes"])
            flows.add_metric([label], c["new_flows"])
            weights, is_panic = v.effective()
            serving = sum(1 for w in weights.values() if w > 0)
            down = len(v.down) if v.health else 0
            backends.add_metric([label, "serving"], serving)
            backends.add_metric([label, "down"], down)
            backends.add_metric([label, "listed"], len(v.backends))
            panic.add_metric([label], 1 if is_panic else 0)
            checked.add_metric([label], 1 if v.health else 0)
        yield from (vips, cap, packets, nbytes, flows, backends, panic, checked)

    def _backends(self, snap):
        packets = CounterMetricFamily("l4lb_backend_packets", "Packets sent to a backend (every VIP)",
                                      labels=["backend"])
        nbytes = CounterMetricFamily("l4lb_backend_bytes", "Bytes of the packets sent to a backend, as "
                                     "received (before encapsulation)", labels=["backend"])
        flows = CounterMetricFamily("l4lb_backend_new_flows", "New flows given to a backend by a fresh "
                                    "Maglev pick", labels=["backend"])
        for address in sorted(snap.indices):
            c = snap.backend_counters(address)
            packets.add_metric([address], c["packets"])
            nbytes.add_metric([address], c["bytes"])
            flows.add_metric([address], c["new_flows"])
        count = GaugeMetricFamily("l4lb_backends", "Backend addresses in use (each has one index)")
        count.add_metric([], len(snap.indices))
        cap = GaugeMetricFamily("l4lb_backends_capacity", "Backend indices the program was built for")
        cap.add_metric([], self.ctrl.capacity.max_backends)
        yield from (count, cap, packets, nbytes, flows)

        weight = GaugeMetricFamily("l4lb_backend_weight", "A backend's weight on a VIP, as set",
                                   labels=["vip", "backend"])
        eff = GaugeMetricFamily("l4lb_backend_effective_weight", "The weight the VIP's ring is built from "
                                "(0 while down, unless the VIP is in panic)", labels=["vip", "backend"])
        up = GaugeMetricFamily("l4lb_backend_up", "Health: 1 up, 0 down; on a VIP without a check "
                               "every backend reports 1", labels=["vip", "backend"])
        pairs = sum(len(v.backends) for v in snap.vips)
        omitted = GaugeMetricFamily("l4lb_metrics_pairs_omitted", "(VIP, backend) listings left out of "
                                    "the per-listing gauges (above --metrics-max-pairs)")
        omitted.add_metric([], pairs if pairs > self.max_pairs else 0)
        if pairs <= self.max_pairs:
            for v in snap.vips:
                label = vip_label(v.key)
                weights, _ = v.effective()
                for address, w in sorted(v.backends.items()):
                    weight.add_metric([label, address], w)
                    eff.add_metric([label, address], weights[address])
                    up.add_metric([label, address], 0 if address in v.down else 1)
        yield from (weight, eff, up, omitted)

    def _capture(self):
        dp = self.ctrl.dp
        copies = CounterMetricFamily("l4lb_capture_copies", "Copies `l4lb capture` asked for: put in the "
                                     "ring, or lost because the ring was full", labels=["outcome"])
        for outcome, n in dp.capture_counts().items():
            copies.add_metric([outcome], n)
        active = GaugeMetricFamily("l4lb_capture_active", "1 while a capture runs")
        active.add_metric([], dp.capture)
        yield copies
        yield active

    def _conntrack(self):
        entries = GaugeMetricFamily("l4lb_conntrack_entries", "Connection-table entries", labels=["family"])
        cap = GaugeMetricFamily("l4lb_conntrack_capacity", "Connection-table capacity", labels=["family"])
        for family, n in self.ctrl.dp.conntrack_entries().items():
            entries.add_metric([FAMILIES[family]], n)
            cap.add_metric([FAMILIES[family]], self.ctrl.capacity.ct_size)
        yield entries
        yield cap


class Exporter:
    """The registry, the histograms that control-plane work feeds, and the
    HTTP server. bind() comes before the program is loaded (a port in use is
    refused with nothing attached); start() serves once the node is open."""

    def __init__(self, host: str, port: int, max_pairs: int = DEFAULT_MAX_PAIRS):
        self.registry = CollectorRegistry(auto_describe=False)
        self.max_pairs = max_pairs
        self.ring_build = Histogram("l4lb_ring_build_seconds", "Time to compute one VIP's Maglev table",
                                    registry=self.registry, buckets=RING_BUILD_BUCKETS)
        self.ring_push = Histogram("l4lb_ring_push_seconds", "Time to write one ring copy into the kernel",
                                   registry=self.registry, buckets=RING_PUSH_BUCKETS)
        self.grpc_latency = Histogram("l4lb_grpc_request_duration_seconds", "gRPC request latency in the "
                                      "server (streams: their whole life)", ["service", "method"],
                                      registry=self.registry, buckets=GRPC_BUCKETS)
        self.grpc_requests = Counter("l4lb_grpc_requests", "gRPC requests by method and status code",
                                     ["service", "method", "code"], registry=self.registry)
        self.host, self.port = host, port
        self.server: _Server | None = None
        self.thread: threading.Thread | None = None
        self._collector = None

    def bind(self) -> int:
        """Binds the listening socket; returns the port (port 0 picks one)."""
        family = 10 if ":" in self.host else 2  # AF_INET6 / AF_INET
        server_cls = type("MetricsServer", (_Server,), {"address_family": family})
        try:
            self.server = make_server(self.host, self.port, make_wsgi_app(self.registry), server_cls,
                                      handler_class=_Quiet)
        except OSError as e:
            raise ValidationError(f"--metrics-listen {self.host}:{self.port}: cannot listen there "
                                  f"({e.strerror or e}); choose another port or stop what holds it") from None
        self.port = self.server.server_port
        return self.port

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        """A finished gRPC call (the server's interceptor calls this)."""
        _, _, rest = method.partition("/")
        service, _, name = rest.partition("/")
        self.grpc_requests.labels(service, name, code).inc()
        self.grpc_latency.labels(service, name).observe(seconds)

    def start_collecting(self, ctrl, prog=None) -> None:
        """The data plane's figures join the registry; ring timings are heard."""
        self._collector = LbCollector(ctrl, prog, self.max_pairs)
        self.registry.register(self._collector)
        timings.listen(timings.RING_BUILD, self.ring_build.observe)
        timings.listen(timings.RING_PUSH, self.ring_push.observe)

    def start(self, ctrl, prog=None) -> None:
        """Collects, and serves on the bound socket."""
        self.start_collecting(ctrl, prog)
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)
        self.thread.start()

    def close(self) -> None:
        timings.unlisten(timings.RING_BUILD, self.ring_build.observe)
        timings.unlisten(timings.RING_PUSH, self.ring_push.observe)
        if self.server is not None:
            if self.thread is not None:
                self.server.shutdown()
            self.server.server_close()
            self.server = None


def _version() -> str:
    try:
        return metadata.version("l4lb")
    except metadata.PackageNotFoundError:
        return "unknown"


def _program_tag(prog) -> str:
    if prog is None:
        return ""
    try:
        return prog.fdinfo().get("prog_tag", "")
    except OSError:
        return ""
