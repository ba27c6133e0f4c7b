"""A gRPC client for the l4lb service, used by the CLI and the tests."""
from __future__ import annotations

import re
from pathlib import Path

import grpc

from l4lb import consts
from l4lb.errors import ValidationError

from .l4lb.v1 import l4lb_pb2 as pb
from .l4lb.v1 import l4lb_pb2_grpc as pb_grpc

_VIP_RE = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<v4>[^:/\[\]]+))(?::(?P<port>\d+))?/(?P<proto>\w+)$")


def parse_vip(text: str) -> pb.VipId:
    """'198.18.10.10:80/tcp', '[fd00:198:18:10::1]:443/tcp', '198.18.10.10/udp' (port 0)."""
    m = _VIP_RE.match(text.strip())
    if not m:
        raise ValidationError(f"VIP {text!r}: write ADDRESS[:PORT]/PROTOCOL, e.g. 198.18.10.10:80/tcp "
                              "or [fd00:198:18:10::1]:443/tcp (no port = every port)")
    return pb.VipId(address=m["v6"] or m["v4"], port=int(m["port"] or 0), protocol=m["proto"])


def parse_backend(text: str, default_weight: int = 1) -> pb.Backend:
    """'198.18.2.1', '198.18.2.1=3', 'fd00:198:18:2::1=2'."""
    addr, sep, w = text.partition("=")
    if sep and not w.isdigit():
        raise ValidationError(f"backend {text!r}: the weight after '=' must be a whole number (0-{consts.MAX_WEIGHT})")
    return pb.Backend(address=addr.strip(), weight=int(w) if sep else default_weight)


def vip_text(vid: pb.VipId) -> str:
    host = f"[{vid.address}]" if ":" in vid.address else vid.address
    return f"{host}:{vid.port}/{vid.protocol}"


def channel(address: str, tls_ca: str | None = None, cert: str | None = None, key: str | None = None):
    if address.startswith("unix:") or not tls_ca:
        return grpc.insecure_channel(address)
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(tls_ca).read_bytes(),
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None)
    return grpc.secure_channel(address, creds)


class Client:
    def __init__(self, address: str, timeout: float = 10.0, **tls):
        self.channel = channel(address, **tls)
        self.stub = pb_grpc.LoadBalancerStub(self.channel)
        self.timeout = timeout

    def close(self):
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def call(self, name: str, request):
        return getattr(self.stub, name)(request, timeout=self.timeout)
