"""Building and running the gRPC server: the LoadBalancer service, the
standard health service and reflection. create_server() binds and returns the
port so that tests can bind port 0; serve() blocks until a signal."""
from __future__ import annotations

import grp
import ipaddress
import os
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from l4lb.errors import ValidationError

from .l4lb.v1 import l4lb_pb2 as pb
from .l4lb.v1 import l4lb_pb2_grpc as pb_grpc

DEFAULT_SOCKET = "unix:/run/l4lb/l4lb.sock"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LoadBalancer"].full_name


@dataclass
class Tls:
    cert: Path
    key: Path
    client_ca: Path | None = None  # require client certificates signed by this CA


def check_listen(address: str, tls: Tls | None) -> None:
    if address.startswith("unix:"):
        if len(address) <= 5:
            raise ValidationError(f"listen address {address!r}: give a socket path after unix:")
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValidationError(f"listen address {address!r}: use unix:PATH or HOST:PORT (e.g. 127.0.0.1:50051)")
    host = host.strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise ValidationError(f"listen address {address!r}: {host!r} is not an IP address") from None
    if not loopback and tls is None:
        raise ValidationError(f"listen address {address}: a non-loopback address needs TLS "
                              "(--tls-cert and --tls-key)")


def create_server(servicer, address: str, tls: Tls | None = None, group: str | None = None,
                  workers: int = 8):
    """Returns (server, port) with the server started."""
    check_listen(address, tls)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
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
        if path.exists():
            path.unlink()  # a stale socket of a previous run
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
                raise ValidationError(f"--group {group!r}: no such group") from None
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
    server.health = health_servicer
    return server, port


def serve(server, on_stop=None) -> None:
    """Blocks until SIGTERM or SIGINT, then stops serving."""
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
        server.stop(grace=2).wait()
        if on_stop:
            on_stop()
