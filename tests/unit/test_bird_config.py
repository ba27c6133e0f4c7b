"""`l4lb bird-config`: BIRD 2 itself accepts what it prints (bird -p), the
template in deploy/ is what it prints for the testbed's node 1, and bad
arguments are one-line errors."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from l4lb.announce import bird_config, parse_table
from l4lb.errors import ValidationError

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "deploy" / "bird-lb.conf"
NODE1 = dict(router_id="198.18.1.6", local_as=64513,
             neighbours=[("198.18.1.5", 64512), ("fd00:198:18:1:1::1", 64512)])


def l4lb(*args):
    return subprocess.run([sys.executable, "-m", "control.cli", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.skipif(not shutil.which("bird"), reason="bird (Debian bird2) is not installed: make setup")
@pytest.mark.parametrize("bfd", [True, False])
def test_bird_parses_the_generated_configuration(tmp_path, bfd):
    conf = tmp_path / "bird.conf"
    conf.write_text(bird_config(**NODE1, table=100, bfd=bfd))
    r = subprocess.run(["bird", "-p", "-c", str(conf)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_generated_configuration_exports_only_the_table_and_imports_nothing():
    text = bird_config(**NODE1, table=4713)
    assert text.count("  kernel table 4713;") == 2 and text.count("learn;") == 2
    assert text.count("export none;") == 2  # nothing goes back into the kernel
    assert 'export where proto = "l4lb_vips4";' in text and 'export where proto = "l4lb_vips6";' in text
    assert text.count("import none;") == 2 and text.count("bfd on;") == 2
    assert "neighbor fd00:198:18:1:1::1 as 64512;" in text and "local as 64513;" in text


def test_template_in_deploy_is_what_the_command_prints_for_node_1():
    body = "".join(line for line in TEMPLATE.read_text().splitlines(keepends=True)
                   if not line.startswith("# ") and line != "#\n")
    r = l4lb("bird-config", "--router-id", "198.18.1.6", "--local-as", "64513",
             "--neighbor", "198.18.1.5", "64512", "--neighbor", "fd00:198:18:1:1::1", "64512")
    assert r.returncode == 0, r.stderr
    assert body.strip() == "".join(line for line in r.stdout.splitlines(keepends=True)
                                   if not line.startswith("# ")).strip()


@pytest.mark.parametrize("args, needle", [
    (["--router-id", "fd00::1", "--local-as", "1", "--neighbor", "198.18.1.5", "2"], "--router-id"),
    (["--router-id", "198.18.1.6", "--local-as", "0", "--neighbor", "198.18.1.5", "2"], "--local-as"),
    (["--router-id", "198.18.1.6", "--local-as", "1"], "--neighbor"),
    (["--router-id", "198.18.1.6", "--local-as", "1", "--neighbor", "127.0.0.1", "2"], "loopback"),
    (["--router-id", "198.18.1.6", "--local-as", "1", "--neighbor", "198.18.1.5", "x"], "AS"),
    (["--router-id", "198.18.1.6", "--local-as", "1", "--neighbor", "198.18.1.5", "2", "--table", "254"], "main"),
])
def test_bad_bird_config_arguments_are_one_line_errors(args, needle):
    r = l4lb("bird-config", *args)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("l4lb: error:") and needle in lines[0]


@pytest.mark.parametrize("value", ["0", "253", "254", "255", "-1", "4294967296", "x", "１２"])
def test_announce_table_refuses_kernel_tables_and_non_numbers(value):
    with pytest.raises(ValidationError):
        parse_table(value)


def test_run_refuses_a_bad_announce_table_before_touching_anything():
    r = l4lb("run", "--interface", "lo", "--announce", "255")
    assert r.returncode == 2 and "table local" in r.stderr
