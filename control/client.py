"""A gRPC client for the l4lb service, used by the CLI and the tests."""
from __future__ import annotations

import re
from pathlib import Path

import grpc

from l4lb import consts
from l4lb.errors import ValidationError, shown
from l4lb.model import parse_decimal, parse_port, parse_protocol, parse_weight

from .l4lb.v1 import l4lb_pb2 as pb
from .l4lb.v1 import l4lb_pb2_grpc as pb_grpc

_VIP_RE = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<v4>[^:/\[\]]+))(?::(?P<port>[^/]*))?/(?P<proto>[A-Za-z0-9]+)$")


def parse_vip(text: str) -> pb.VipId:
    """'198.18.10.10:80/tcp', '[fd00:198:18:10::1]:443/tcp', '198.18.10.10/udp' (port 0)."""
    m = _VIP_RE.match(text.strip())
    if not m:
        raise ValidationError(f"VIP {shown(text)}: write ADDRESS[:PORT]/PROTOCOL, e.g. 198.18.10.10:80/tcp "
                              "or [fd00:198:18:10::1]:443/tcp (no port = every port)")
    port = parse_port(m["port"], f"VIP {shown(text)}: port") if m["port"] is not None else 0
    return pb.VipId(address=m["v6"] or m["v4"], port=port, protocol=parse_protocol(m["proto"], f"VIP {shown(text)}: protocol"))


def parse_backend(text: str, default_weight: int = 1) -> pb.Backend:
    """'198.18.2.1', '198.18.2.1=3', 'fd00:198:18:2::1=2'."""
    addr, sep, w = text.partition("=")
    weight = default_weight
    if sep:
        what = f"backend {shown(text)}: the weight after '='"
        weight = parse_weight(parse_decimal(w, what, f"0-{consts.MAX_WEIGHT}"), what)
    return pb.Backend(address=addr.strip(), weight=weight)


def vip_text(vid: pb.VipId) -> str:
    host = f"[{vid.address}]" if ":" in vid.address else vid.address
    return f"{host}:{vid.port}/{vid.protocol}"


def _read(path: str | None, option: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValidationError(f"{option} {shown(path)}: cannot read it ({e.strerror})") from None


def channel(address: str, tls_ca: str | None = None, cert: str | None = None, key: str | None = None):
    if address.startswith("unix:") or not tls_ca:
        return grpc.insecure_channel(address)
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(tls_ca, "--tls-ca"),
        private_key=_read(key, "--tls-key-client"),
        certificate_chain=_read(cert, "--tls-cert-client"))
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
