"""Health checks through every door of the real server: the CLI (`l4lb
health set`, `l4lb health [VIP]`), a YAML file (`l4lb apply -f` and the Apply
RPC) and SetHealthCheck. A bad check is refused in one line and changes
nothing, whichever door it came through."""
from __future__ import annotations

import os
import subprocess
import time

import grpc
import pytest

from control.l4lb.v1 import l4lb_pb2 as pb
from test_server import L4LB, server  # noqa: F401  (module-scoped fixture)

pytestmark = pytest.mark.kernel
VIP_TEXT = "198.18.10.70:80/tcp"
VIP = pb.VipId(address="198.18.10.70", port=80, protocol="tcp")
GOOD_YAML = """
vips:
  - address: 198.18.10.70
    port: 80
    protocol: tcp
    backends: [{address: 198.18.2.1}, {address: 198.18.2.2}]
    health: {kind: http, port: 8080, path: /healthz, interval: 1, timeout: 0.5, via: direct}
"""


def _cli(server, *args):  # noqa: F811
    return subprocess.run([L4LB, *args, "--server", f"unix:{server.sock}"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200"})  # rich's tables: wide enough for whole addresses


def _config(c) -> list:
    """What the operator set: each VIP's backends, weights and check (not the
    probes' results, which move on their own)."""
    return [(v.id, sorted((b.address, b.weight) for b in v.backends), v.health)
            for v in c.call("ListVips", pb.ListVipsRequest()).vips]


@pytest.fixture
def checked(server, tmp_path):  # noqa: F811
    f = tmp_path / "good.yaml"
    f.write_text(GOOD_YAML)
    r = _cli(server, "apply", "-f", str(f))
    assert r.returncode == 0, r.stderr
    with server.client() as c:
        yield c
        c.call("DeleteVip", pb.DeleteVipRequest(id=VIP))


def test_a_check_set_by_the_cli_shows_in_its_table(server, checked):  # noqa: F811
    r = _cli(server, "health", "set", VIP_TEXT, "--kind", "tcp", "--port", "8081", "--interval", "0.5",
             "--timeout", "0.2", "--rise", "3", "--fall", "4", "--via", "direct", "--min-healthy", "30")
    assert r.returncode == 0, r.stderr
    h = checked.call("GetVip", pb.GetVipRequest(id=VIP)).health
    assert (h.kind, h.port, h.interval, h.timeout, h.rise, h.fall, h.via, h.min_healthy) == \
        ("tcp", 8081, 0.5, 0.2, 3, 4, "direct", 30)
    for argv in (["health", VIP_TEXT], ["health"], ["health", "show", VIP_TEXT]):
        r = _cli(server, *argv)
        assert r.returncode == 0, r.stderr
        assert VIP_TEXT in r.stdout and "198.18.2.1" in r.stdout and "198.18.2.2" in r.stdout, r.stdout
    r = _cli(server, "health", "clear", VIP_TEXT)
    assert r.returncode == 0 and not checked.call("GetVip", pb.GetVipRequest(id=VIP)).HasField("health")
    assert "no health check" in _cli(server, "health", VIP_TEXT).stdout


@pytest.mark.parametrize("args, words", [
    (["--rise", "1000"], "health.rise"),
    (["--fall", "0", "--rise", "101"], "health.rise"),
    (["--interval", "1", "--timeout", "5"], "longer than the interval"),
    (["--interval", "nan"], "health.interval"),
    (["--interval", "0.01"], "health.interval"),
    (["--min-healthy", "101"], "health.min_healthy"),
    (["--port", "70000"], "health.port"),
    (["--kind", "http", "--path", "healthz"], "health.path"),
    (["--kind", "http", "--expect", "99"], "health.expect"),
    (["--kind", "http", "--host", "a b"], "health.host"),
    (["--kind", "tcp", "--path", "/x"], "only for kind http"),
])
def test_a_bad_check_from_the_cli_is_one_line_and_changes_nothing(server, checked, args, words):  # noqa: F811
    before = _config(checked)
    r = _cli(server, "health", "set", VIP_TEXT, *args)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and words in r.stderr, r.stderr
    assert _config(checked) == before


BAD_HEALTH = [
    ("{kind: udp}", "health.kind"),
    ("{kind: tcp, rise: 0}", "health.rise"),
    ("{kind: tcp, intervall: 1}", "unknown key"),
    ("{kind: tcp, interval: 1, timeout: 3}", "longer than the interval"),
    ("{kind: http, expect: [200, 'ok']}", "health.expect"),
    ("{kind: tcp, via: somehow}", "health.via"),
    ("[tcp]", "expected a mapping"),
]


@pytest.mark.parametrize("health, words", BAD_HEALTH)
def test_a_bad_check_in_a_file_is_refused_whole(server, checked, tmp_path, health, words):  # noqa: F811
    text = GOOD_YAML.replace("{kind: http, port: 8080, path: /healthz, interval: 1, timeout: 0.5, via: direct}", health)
    text += "  - {address: 198.18.10.71, port: 80, protocol: tcp, backends: [{address: 198.18.2.3}]}\n"
    before = _config(checked)
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    r = _cli(server, "apply", "-f", str(f))  # the CLI reads the file first: refused before the call
    assert r.returncode == 2 and r.stderr.startswith("l4lb: error: "), r.stderr
    assert r.stderr.strip().count("\n") == 0 and words in r.stderr, r.stderr
    with pytest.raises(grpc.RpcError) as e:  # and the server, for a client that sends it anyway
        checked.call("Apply", pb.ApplyRequest(config_yaml=text))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in e.value.details()
    assert _config(checked) == before, "nothing of the file was applied"


def test_changing_a_check_keeps_what_the_probes_found(server):  # noqa: F811
    """A check replaced by another (here: its interval) keeps each backend's
    state: the prober carries its findings over, and so must the table."""
    vid = pb.VipId(address="198.18.10.71", port=80, protocol="tcp")
    check = pb.HealthCheck(kind="tcp", port=8081, interval=0.2, timeout=0.1, rise=1, fall=1, via="direct")
    with server.client() as c:
        c.call("AddVip", pb.AddVipRequest(id=vid, backends=[pb.Backend(address=a, weight=1)
                                                            for a in ("198.18.2.1", "198.18.2.2")]))
        try:
            c.call("SetHealthCheck", pb.SetHealthCheckRequest(id=vid, health=check))
            deadline = time.monotonic() + 10
            while {b.health for b in c.call("GetVip", pb.GetVipRequest(id=vid)).backends} != {"down"}:
                assert time.monotonic() < deadline, "nothing answers on port 8081: both should go down"
                time.sleep(0.1)
            check.interval = 0.3
            c.call("SetHealthCheck", pb.SetHealthCheckRequest(id=vid, health=check))
            for _ in range(10):  # the prober reports no transition: the table must not invent one
                v = c.call("GetVip", pb.GetVipRequest(id=vid))
                assert {b.health for b in v.backends} == {"down"} and v.health.interval == 0.3
                time.sleep(0.1)
        finally:
            c.call("DeleteVip", pb.DeleteVipRequest(id=vid))
