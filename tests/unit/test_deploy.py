"""The systemd unit in deploy/ starts `l4lb run` and is accepted by systemd."""
import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "l4lb.service"


def test_unit_runs_l4lb_run_and_stops_with_sigterm():
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.read(UNIT)
    assert "l4lb\" run --interface" in cp["Service"]["ExecStart"]
    assert cp["Service"]["KillSignal"] == "SIGTERM"
    assert cp["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_accepts_the_unit():
    r = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True)
    assert r.returncode == 0 and "Invalid" not in r.stderr, r.stderr
