"""The real `l4lb` command with bad arguments: one line on stderr that
starts `l4lb: error:`, exit status 2, never a traceback. None of these needs
a server: the arguments are refused before any connection."""
import subprocess
import sys
from pathlib import Path

import pytest

from control.client import parse_backend, parse_vip
from l4lb.errors import ValidationError

L4LB = str(Path(sys.executable).with_name("l4lb"))
NOWHERE = ["--server", "unix:/nonexistent/l4lb-test.sock"]

BAD_ARGS = [
    ["vip", "add", "198.18.10.10:80/tcp", "--backend", "198.18.2.1=²"],
    ["vip", "add", "198.18.10.10:80/tcp", "--backend", "198.18.2.1=99999999999"],
    ["vip", "add", "198.18.10.10:80/tcp", "--backend", "198.18.2.1=-1"],
    ["vip", "add", "198.18.10.10:4294967296/tcp"],
    ["vip", "add", "198.18.10.10:٨٠/tcp"],
    ["vip", "add", "198.18.10.10:80/tcp", "--backend", "198.18.2.1=" + "9" * 5000],
    ["backend", "weight", "198.18.10.10:80/tcp", "198.18.2.1=²"],
    ["lookup", "198.18.0.1:99999999999", "198.18.10.10:80", "tcp"],
    ["lookup", "198.18.0.1:٨٠", "198.18.10.10:80", "tcp"],
    ["lookup", "198.18.0.1", "198.18.10.10:80", "tcp"],
    ["flows", "show", "198.18.10.10:80/tcp", "--limit", "-1"],
    ["flows", "show", "198.18.10.10:80/tcp", "--limit", "0"],
    ["flows", "show", "198.18.10.10:80/tcp", "--limit", "١٠"],
    ["stats", "--watch", "--interval", "nan"],
    ["stats", "--watch", "--interval", "٣"],
    ["run", "--interface", "lo", "--max-vips", "٨"],
    ["vip", "add"],
    ["status", "--server", "unix:/nonexistent/a.sock", "--server", "unix:/nonexistent/a.sock"],
    ["apply", "-f", "/nonexistent/lb.yaml", "--server", "unix:/nonexistent/a", "--server", "unix:/nonexistent/b"],
    ["demo", "--fleet", "0"],
    ["lab", "up", "--fleet", "99"],
    ["run", "--interface", "lo", "--announce", "main"],
    ["vip", "add", "198.18.10.10:80/" + "x" * 100_000],
    ["lookup", "198.18.0.1:1", "198.18.10.10:80", "x" * 100_000],
    ["status", "--server", "198.18.1.1:50051", "--tls-ca", "/nonexistent/ca.pem"],
    ["gateway", "--server", "198.18.1.1:50051", "--tls-ca", "/etc/hostname", "--tls-key-client", "/nonexistent/k"],
    ["health", "198.18.10.10:80/sctp"],
    ["health", "--watch", "198.18.10.10:80"],
    ["health", "--watch", "198.18.10.10:80/tcp", "198.18.10.11:80/tcp"],
    ["health", "show", "[fd00:198:18:10::1]:٤٤٣/tcp", "--watch"],
    ["health", "set", "198.18.10.10:80/tcp", "--kind", "udp"],
    ["health", "set", "198.18.10.10:80/tcp", "--rise", "two"],
    ["vip", "add", "198.18.10.10:80/tcp", "--encap", "vxlan"],
    ["vip", "add", "198.18.10.10:80/tcp", "--encap", ""],
    ["vip", "add", "198.18.10.10:80/tcp", "--encap"],
    ["vip", "encap", "198.18.10.10:80/tcp", "fou"],
    ["vip", "encap", "198.18.10.10:80/tcp"],
]


@pytest.mark.parametrize("argv", BAD_ARGS, ids=lambda a: " ".join(a)[:60])
def test_a_bad_argument_is_one_line_and_status_2(argv):
    r = subprocess.run([L4LB, *argv, *([] if "--server" in argv else NOWHERE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("l4lb: error: "), r.stderr
    assert len(lines[0]) < 400


@pytest.mark.parametrize("text", ["198.18.10.10:٨٠/tcp", "198.18.10.10:4294967296/tcp", "198.18.10.10:/tcp"])
def test_vip_ports_are_ascii_numbers_in_range(text):
    with pytest.raises(ValidationError, match="port"):
        parse_vip(text)


def test_vip_and_backend_texts_parse():
    v = parse_vip("[fd00:198:18:10::1]:443/tcp")
    assert (v.address, v.port, v.protocol) == ("fd00:198:18:10::1", 443, "tcp")
    assert parse_vip("198.18.10.10/udp").port == 0
    b = parse_backend("198.18.2.1=3")
    assert (b.address, b.weight) == ("198.18.2.1", 3)
    assert parse_backend("198.18.2.1").weight == 1
