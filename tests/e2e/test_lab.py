"""`l4lb lab up` leaves the demo's testbed running in a process of its own,
with commands printed that work; `l4lb lab down` removes all of it."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from control.lab import LAB_FILE, _running

L4LB = str(Path(sys.executable).with_name("l4lb"))


def l4lb(*args, timeout=700):
    return subprocess.run([L4LB, *args], capture_output=True, text=True, timeout=timeout)


def test_lab_up_prints_working_commands_and_lab_down_removes_everything():
    if _running():
        pytest.skip(f"a lab is running on this machine ({LAB_FILE}); not touching it")
    up = l4lb("lab", "up")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        ns = re.search(r"namespaces (l4lbtb-[0-9a-f]+)-\*", up.stdout)[1]
        assert "answering server holds TCP and UDP port 80" in up.stdout  # and how to try a server of one's own
        asks = [line.strip() for line in up.stdout.splitlines() if " -m l4lb.testbed ask " in line]
        assert len(asks) == 2
        for cmd in asks:  # the printed command, run as printed
            r = subprocess.run(cmd.split(), capture_output=True, text=True, timeout=30)
            assert r.returncode == 0 and re.fullmatch(r"b[123] hello", r.stdout.strip()), r.stdout + r.stderr
        line = next(line for line in up.stdout.splitlines() if " status --server " in line)
        status = line.split(": ", 1)[1].split("(")[0].split()
        r = subprocess.run(status, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "VIPs" in r.stdout
        assert l4lb("lab", "show").returncode == 0
        again = l4lb("lab", "up")
        assert again.returncode == 2 and "running already" in again.stderr
    finally:
        down = l4lb("lab", "down")
    assert down.returncode == 0, down.stderr
    assert not [n for n in Path("/run/netns").iterdir() if n.name.startswith(ns + "-")]
    assert not LAB_FILE.exists()
    assert l4lb("lab", "show").returncode == 1
