"""`l4lb run`'s listener: a socket path another daemon serves on is never
taken over, a file that is not a socket is never deleted, only a stale socket
is replaced; TCP needs mutual TLS unless the operator passes
--insecure-allow-unauthenticated; every refusal comes before the program is
loaded, so the interface is left as it was."""
from __future__ import annotations

import socket
import subprocess
import time

import pytest

from control.l4lb.v1 import l4lb_pb2 as pb
from test_server import L4LB, Server, _ip, server  # noqa: F401  (module-scoped fixture)
from test_tls import _certs

pytestmark = pytest.mark.kernel


def _run(s: Server, listen: str, *extra, timeout: float = 30) -> tuple[int | None, str]:
    """Starts `l4lb run`; returns (exit status, output), or (None, output)
    if it is still running after `timeout` seconds (then it is stopped)."""
    proc = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{s.ns}", L4LB, "run", "--interface", s.ifname, "--listen", listen,
         "--state-dir", str(s.state), "--max-vips", "8", "--max-backends", "64", "--ct-size", "4096", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        return None, out


@pytest.fixture
def other(tmp_path):
    s = Server(tmp_path)
    try:
        yield s
    finally:
        s.cleanup()


def test_a_socket_another_daemon_serves_on_is_refused(server, other):  # noqa: F811
    rc, out = _run(other, f"unix:{server.sock}")
    assert rc == 2, out
    assert "another process serves on it" in out and "Traceback" not in out
    assert other.xdp_id() == ""  # refused before the program was loaded
    with server.client() as c:  # the first daemon still serves on its socket
        assert c.call("GetStatus", pb.GetStatusRequest()).interface == server.ifname


def test_a_file_that_is_not_a_socket_is_left_alone(other, tmp_path):
    path = tmp_path / "precious.txt"
    path.write_text("not a socket\n")
    rc, out = _run(other, f"unix:{path}")
    assert rc == 2, out
    assert "is not a socket" in out
    assert path.read_text() == "not a socket\n"
    assert other.xdp_id() == ""


def test_a_stale_socket_is_replaced(other):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(other.sock))  # a socket file nobody listens on, as a crashed run leaves
    other.start()
    with other.client() as c:
        assert c.call("GetStatus", pb.GetStatusRequest()).interface == other.ifname


@pytest.mark.parametrize("listen, tls, why", [
    ("127.0.0.1:50051", False, "--insecure-allow-unauthenticated"),
    ("0.0.0.0:50051", False, "needs TLS"),
    ("127.0.0.1:50051", True, "--tls-client-ca"),
])
def test_tcp_without_client_authentication_is_refused_before_loading(other, tmp_path, listen, tls, why):
    extra = []
    if tls:
        c = _certs(tmp_path)
        extra = ["--tls-cert", str(c["server.pem"]), "--tls-key", str(c["server.key"])]
    rc, out = _run(other, listen, *extra)
    assert rc == 2, out
    assert why in out and len(out.strip().splitlines()) == 1, out
    assert other.xdp_id() == ""


def test_a_non_loopback_address_without_tls_is_refused_even_when_allowed(other):
    rc, out = _run(other, "0.0.0.0:50051", "--insecure-allow-unauthenticated")
    assert rc == 2 and "needs TLS" in out, out
    assert other.xdp_id() == ""


def _serves_tcp(s: Server, address: str, *client_args) -> bool:
    r = subprocess.run(["nsenter", f"--net=/run/netns/{s.ns}", L4LB, "status", "--server", address, *client_args],
                       capture_output=True, text=True, timeout=30)
    return r.returncode == 0 and s.ifname in r.stdout


@pytest.mark.parametrize("tls", [False, True])
def test_an_explicitly_allowed_unauthenticated_listener_serves_with_a_warning(other, tmp_path, tls):
    _ip("-n", other.ns, "link", "set", "lo", "up")
    extra, client = ["--insecure-allow-unauthenticated"], []
    if tls:
        c = _certs(tmp_path)
        extra += ["--tls-cert", str(c["server.pem"]), "--tls-key", str(c["server.key"])]
        client = ["--tls-ca", str(c["ca.pem"])]
    log = tmp_path / "run.log"
    other.proc = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{other.ns}", L4LB, "run", "--interface", other.ifname,
         "--listen", "127.0.0.1:50051", "--state-dir", str(other.state), *extra],
        stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not _serves_tcp(other, "127.0.0.1:50051", *client):
        assert other.proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.5)
    assert "can change the load balancer" in log.read_text()  # the warning


def test_mutual_tls_on_tcp_needs_no_flag(other, tmp_path):
    _ip("-n", other.ns, "link", "set", "lo", "up")
    c = _certs(tmp_path)
    log = tmp_path / "run.log"
    other.proc = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{other.ns}", L4LB, "run", "--interface", other.ifname,
         "--listen", "127.0.0.1:50051", "--state-dir", str(other.state), "--tls-cert", str(c["server.pem"]),
         "--tls-key", str(c["server.key"]), "--tls-client-ca", str(c["ca.pem"])],
        stdout=open(log, "w"), stderr=subprocess.STDOUT)
    client = ["--tls-ca", str(c["ca.pem"]), "--tls-cert-client", str(c["client.pem"]),
              "--tls-key-client", str(c["client.key"])]
    deadline = time.monotonic() + 60
    while not _serves_tcp(other, "127.0.0.1:50051", *client):
        assert other.proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.5)
    assert not _serves_tcp(other, "127.0.0.1:50051", "--tls-ca", str(c["ca.pem"]))  # no client certificate
    assert "can change the load balancer" not in log.read_text()
