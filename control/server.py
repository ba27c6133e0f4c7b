"""Building and running the gRPC server: the LoadBalancer service, the
standard health service and reflection. create_server() binds and returns the
port so that tests can bind port 0; serve() blocks until a signal."""
from __future__ import annotations

import grp
import ipaddress
import logging
import os
import signal
import socket
import stat
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from l4lb.errors import ValidationError, shown

from .l4lb.v1 import l4lb_pb2 as pb
from .l4lb.v1 import l4lb_pb2_grpc as pb_grpc

DEFAULT_SOCKET = "unix:/run/l4lb/l4lb.sock"
log = logging.getLogger("l4lb.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LoadBalancer"].full_name


@dataclass
class Tls:
    cert: Path
    key: Path
    client_ca: Path | None = None  # require client certificates signed by this CA


UNARY_WORKERS = 64  # threads kept for unary calls: as many concurrent writers are committed together
MAX_STREAMS = 8  # streaming calls open at once; beyond it RESOURCE_EXHAUSTED
STOP_GRACE = 2.0  # seconds calls in flight get on SIGTERM
INSECURE_FLAG = "--insecure-allow-unauthenticated"


def check_listen(address: str, tls: Tls | None, allow_unauthenticated: bool = False) -> str | None:
    """Refuses a listen address that would let unauthenticated clients change
    the load balancer, or that another process serves on; returns a warning
    when the operator allowed an unauthenticated listener. Runs before the
    program is loaded: nothing is attached when the answer is no."""
    if address.startswith("unix:"):
        if len(address) <= 5:
            raise ValidationError(f"listen address {shown(address)}: give a socket path after unix:")
        socket_path_state(Path(address[5:]))
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValidationError(f"listen address {shown(address)}: use unix:PATH or HOST:PORT (e.g. 127.0.0.1:50051)")
    host = host.strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise ValidationError(f"listen address {shown(address)}: {shown(host)} is not an IP address") from None
    if tls is None and not loopback:
        raise ValidationError(f"listen address {address}: a non-loopback address needs TLS with client "
                              "certificates (--tls-cert, --tls-key, --tls-client-ca)")
    if tls is None:
        if not allow_unauthenticated:
            raise ValidationError(f"listen address {address}: plain TCP lets every local user change the load "
                                  "balancer; use unix:PATH (mode 0660, --group), or TLS with --tls-client-ca, "
                                  f"or pass {INSECURE_FLAG}")
        return (f"serving gRPC on {address} without authentication ({INSECURE_FLAG}): "
                "every local user can change the load balancer")
    for option, path in (("--tls-cert", tls.cert), ("--tls-key", tls.key), ("--tls-client-ca", tls.client_ca)):
        if path is not None and not os.access(path, os.R_OK):
            raise ValidationError(f"{option} {shown(str(path))}: cannot read it")
    if tls.client_ca is None:
        if not allow_unauthenticated:
            raise ValidationError(f"listen address {address}: TLS without --tls-client-ca lets every client that "
                                  "trusts the server's CA change the load balancer; give --tls-client-ca "
                                  f"(mutual TLS) or pass {INSECURE_FLAG}")
        return (f"serving gRPC on {address} with TLS but without client certificates ({INSECURE_FLAG}): "
                "every client that trusts the server's CA can change the load balancer")
    return None


def socket_path_state(path: Path) -> str:
    """'free', or 'stale' (a socket nobody answers on, safe to remove).
    Refuses a path that a live server holds or that is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "free"
    except OSError as e:
        raise ValidationError(f"listen path {shown(str(path))}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ValidationError(f"listen path {shown(str(path))} exists and is not a socket; "
                              "remove it yourself or choose another path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            return "stale"
        except OSError as e:
            raise ValidationError(f"listen path {shown(str(path))}: cannot tell whether a server uses it "
                                  f"({e.strerror}); remove it yourself or choose another path") from None
    raise ValidationError(f"listen path {shown(str(path))}: another process serves on it (another l4lb run?); "
                          "stop it or choose another path")


class StreamLimit(grpc.ServerInterceptor):
    """At most `limit` streaming calls hold a worker thread at once, so that
    streams never take the threads unary calls need; one more is refused
    with RESOURCE_EXHAUSTED. (Handlers that do not hold a thread, as the
    health service's Watch, are not counted.)"""

    def __init__(self, limit: int):
        self.limit = limit
        self.slots = threading.BoundedSemaphore(limit)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        behavior = handler.unary_stream or handler.stream_stream or handler.stream_unary
        if getattr(behavior, "experimental_non_blocking", False):
            return handler
        method = handler_call_details.method

        def take_slot(context):
            if not self.slots.acquire(blocking=False):
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{self.limit} streaming calls are open already, the most this server serves at "
                              f"once; close one (or poll with a unary call) and try again ({method})")

        def streaming(request, context):
            take_slot(context)
            try:
                yield from behavior(request, context)
            finally:
                self.slots.release()

        def stream_in(request_iterator, context):
            take_slot(context)
            try:
                return behavior(request_iterator, context)
            finally:
                self.slots.release()

        kinds = {"unary_stream": (grpc.unary_stream_rpc_method_handler, streaming),
                 "stream_stream": (grpc.stream_stream_rpc_method_handler, streaming),
                 "stream_unary": (grpc.stream_unary_rpc_method_handler, stream_in)}
        make, call = next(kinds[k] for k in kinds if getattr(handler, k))
        return make(call, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


class RequestObserver(grpc.ServerInterceptor):
    """Reports every finished call as observe(method, status code name,
    seconds): the metrics' requests by method and code, and their latency.
    A stream counts once, when it ends. (Handlers that do not hold a thread,
    as the health service's Watch, are left alone.)"""

    def __init__(self, observe):
        self.observe = observe

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        if getattr(behavior, "experimental_non_blocking", False):
            return handler
        method, observe = handler_call_details.method, self.observe

        def finish(context, t0, failed: bool) -> None:
            code = context.code() if hasattr(context, "code") else None
            if code is None:
                code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
            observe(method, code.name, time.perf_counter() - t0)

        def single(request, context):
            t0, failed = time.perf_counter(), True
            try:
                out = behavior(request, context)
                failed = False
                return out
            finally:
                finish(context, t0, failed)

        def streaming(request, context):
            t0, failed = time.perf_counter(), True
            try:
                yield from behavior(request, context)
                failed = False
            finally:
                finish(context, t0, failed)

        kinds = {"unary_unary": (grpc.unary_unary_rpc_method_handler, single),
                 "unary_stream": (grpc.unary_stream_rpc_method_handler, streaming),
                 "stream_unary": (grpc.stream_unary_rpc_method_handler, single),
                 "stream_stream": (grpc.stream_stream_rpc_method_handler, streaming)}
        make, call = next(kinds[k] for k in kinds if getattr(handler, k))
        return make(call, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


def create_server(servicer, address: str, tls: Tls | None = None, group: str | None = None,
                  workers: int = UNARY_WORKERS, streams: int = MAX_STREAMS,
                  allow_unauthenticated: bool = False, observe=None):
    """Returns (server, port) with the server started. `workers` threads stay
    for unary calls however many of the `streams` streaming calls are open.
    observe(method, code, seconds) hears of every finished call."""
    warning = check_listen(address, tls, allow_unauthenticated)
    if warning:
        log.warning("%s", warning)
    interceptors = ([RequestObserver(observe)] if observe else []) + [StreamLimit(streams)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers + streams, thread_name_prefix="grpc"),
                         interceptors=interceptors,
                         options=[("grpc.keepalive_time_ms", 30000), ("grpc.keepalive_timeout_ms", 10000)])
    pb_grpc.add_LoadBalancerServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (SERVICE_NAME, ""):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server)
    if address.startswith("unix:"):
        path = Path(address[5:])
        path.parent.mkdir(parents=True, exist_ok=True)
        if socket_path_state(path) == "stale":
            path.unlink()  # the socket of a run that ended without removing it
        port = server.add_insecure_port(address)
    elif tls:
        creds = grpc.ssl_server_credentials(
            [(tls.key.read_bytes(), tls.cert.read_bytes())],
            root_certificates=tls.client_ca.read_bytes() if tls.client_ca else None,
            require_client_auth=tls.client_ca is not None)
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    server.start()
    if address.startswith("unix:"):
        path = Path(address[5:])
        gid = -1
        if group:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                server.stop(0)
                raise ValidationError(f"--group {shown(group)}: no such group") from None
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
    server.health = health_servicer
    server.stopping = getattr(servicer, "stop_streams", None)
    return server, port


def serve(server, on_stop=None) -> None:
    """Blocks until SIGTERM or SIGINT, then stops serving: streams end at
    once, other calls get STOP_GRACE seconds."""
    done = threading.Event()

    def stop(signum, frame):
        done.set()

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        done.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        server.health.enter_graceful_shutdown()
        if server.stopping:
            server.stopping()
        server.stop(grace=STOP_GRACE).wait()
        if on_stop:
            on_stop()
