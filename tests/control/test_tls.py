"""Listening: unix socket by default; TCP only with mutual TLS, unless the
operator explicitly allows an unauthenticated listener (loopback only
without TLS)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest

from control.client import Client
from control.l4lb.v1 import l4lb_pb2 as pb
from control.server import Tls, check_listen, create_server
from control.servicer import LoadBalancerServicer
from l4lb import bpf, consts
from l4lb.controller import Controller
from l4lb.dataplane import Dataplane, RuntimeConfig
from l4lb.errors import ValidationError

pytestmark = pytest.mark.kernel


@pytest.mark.parametrize("address", ["198.18.1.1:50051", "[fd00:198:18:1::1]:50051", "0.0.0.0:50051", "[::]:1"])
@pytest.mark.parametrize("allow", [False, True])
def test_a_non_loopback_address_needs_tls_always(address, allow):
    with pytest.raises(ValidationError, match="needs TLS"):
        check_listen(address, None, allow)


def test_a_unix_socket_needs_no_tls(tmp_path):
    assert check_listen(f"unix:{tmp_path}/x.sock", None) is None


@pytest.mark.parametrize("address", ["127.0.0.1:0", "[::1]:50051", "localhost:1"])
def test_plain_tcp_on_loopback_only_when_explicitly_allowed(address):
    with pytest.raises(ValidationError, match="--insecure-allow-unauthenticated"):
        check_listen(address, None)
    assert "without authentication" in check_listen(address, None, allow_unauthenticated=True)


@pytest.mark.parametrize("address", ["127.0.0.1:0", "198.18.1.1:50051"])
def test_tls_without_client_certificates_only_when_explicitly_allowed(tmp_path, address):
    c = _certs(tmp_path)
    tls = Tls(c["server.pem"], c["server.key"])
    with pytest.raises(ValidationError, match="--tls-client-ca"):
        check_listen(address, tls)
    assert "without client certificates" in check_listen(address, tls, allow_unauthenticated=True)
    assert check_listen(address, Tls(c["server.pem"], c["server.key"], c["ca.pem"])) is None


def test_unreadable_tls_files_are_refused_before_anything_starts(tmp_path):
    with pytest.raises(ValidationError, match="--tls-client-ca"):
        check_listen("198.18.1.1:50051", Tls(Path("/etc/hostname"), Path("/etc/hostname"), tmp_path / "none.pem"))


@pytest.mark.parametrize("address", ["unix:", "nohost", "127.0.0.1:http", "lb.example:80"])
def test_malformed_listen_addresses_are_refused(address):
    with pytest.raises(ValidationError):
        check_listen(address, None)


def _certs(d: Path) -> dict[str, Path]:
    def run(*a):
        subprocess.run(["openssl", *a], check=True, capture_output=True, cwd=d)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=l4lb test CA")
    for name in ("server", "client"):
        ext = d / f"{name}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1\n")
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", str(ext))
    return {n: d / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.fixture(scope="module")
def controller():
    cap = consts.Capacity(max_vips=4, max_backends=16, ct_size=1024, ring_size=251)
    prog = bpf.load_balancer(cap)
    yield Controller(Dataplane(prog, cap), RuntimeConfig())
    prog.close()


def test_tls_with_client_certificates_serves_only_verified_clients(tmp_path, controller):
    c = _certs(tmp_path)
    server, port = create_server(LoadBalancerServicer(controller), "127.0.0.1:0",
                                 tls=Tls(c["server.pem"], c["server.key"], c["ca.pem"]))
    try:
        addr = f"127.0.0.1:{port}"
        with Client(addr, tls_ca=str(c["ca.pem"]), cert=str(c["client.pem"]), key=str(c["client.key"])) as cl:
            assert cl.call("GetGateway", pb.GetGatewayRequest()).mac == "02:00:00:00:00:01"
        with Client(addr, tls_ca=str(c["ca.pem"])) as cl:  # no client certificate
            with pytest.raises(grpc.RpcError) as e:
                cl.call("GetGateway", pb.GetGatewayRequest())
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        with Client(addr) as cl:  # plaintext against TLS
            with pytest.raises(grpc.RpcError):
                cl.call("GetGateway", pb.GetGatewayRequest())
    finally:
        server.stop(0)
