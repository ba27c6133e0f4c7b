"""The whole benchmark, end to end, in its smoke mode (tiny repeats, one
round): every part runs, proves its paths, lands in the one JSON, and the
plots are real PNGs. No timing is asserted."""
import io
import json

import pytest
from rich.console import Console

from bench import run as bench_run

pytestmark = pytest.mark.kernel

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    console = Console(file=io.StringIO(), width=160)
    res = bench_run.run("smoke", out, console=console)
    return res, out, console.file.getvalue()


def test_the_json_has_every_section(smoke):
    _, out, _ = smoke
    saved = json.loads((out / "results.json").read_text())
    assert saved["mode"] == "smoke"
    for key in ("cpu_model", "cores", "kernel", "date"):
        assert saved["machine"][key]
    for part in bench_run.PARTS:
        assert part in saved, part
        assert part in saved["parts"] and "duration_s" in saved["parts"][part]
    assert saved["traffic"].get("skipped") or "ratio" in saved["traffic"]
    assert saved["summary"] and all({"part", "what", "value"} <= set(r) for r in saved["summary"])


def test_every_part_proved_its_paths(smoke):
    res, _, _ = smoke
    bad = {p: res[p].get("failures") or res[p].get("error")
           for p, s in res["parts"].items() if not s["ok"]}
    assert bad == {}
    assert res["ok"]


def test_each_section_holds_what_the_plots_and_summary_read(smoke):
    res, _, _ = smoke
    assert {c["name"] for c in res["pktcost"]["cases"]} >= {"established", "syn", "encap"}
    points = res["scaling"]["summary"]["points"]
    assert list(points["backends"]) == ["1", "16", "256", "4096"]
    assert list(points["vips"]) == ["1", "8", "64", "512"]
    assert list(points["conntrack"]) == ["empty", "full"]
    state = res["scaling"]["point_state"]
    assert state["backends"]["4096"][0]["ring_distinct_backends"] == 4096
    assert state["vips"]["512"][0]["vips_in_map"] == 512
    full = state["conntrack"]["full"][0]
    assert full["entries"] >= full["share_of_this_cpu"] - 16
    rtp = res["controlplane"]["rpc_to_packet"]
    for kind in ("AddBackends", "SetBackendWeights"):
        assert rtp[kind]["runs_needed"]["max"] == 1
    assert {b["ring_size"] for b in res["quality"]["balance"]} == {65537, 655373}
    assert all(b["within_one_entry"] for b in res["quality"]["balance"])


def test_the_plots_are_non_empty_pngs(smoke):
    res, out, _ = smoke
    assert len(res["plots"]) == 4
    for name in res["plots"]:
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name


def test_progress_and_summary_are_shown(smoke):
    _, _, text = smoke
    for part in bench_run.PARTS:
        assert f"] {part}" in text
    assert "l4lb benchmark (smoke" in text and "results.json" in text
