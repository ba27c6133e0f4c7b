"""Every benchmark in one command: one JSON of all results with the machine's
description, a summary table, and PNG plots.

    make bench          # .venv/bin/python -m bench.run          full, under 10 minutes here
    make bench-quick    # .venv/bin/python -m bench.run --quick  under a minute
    .venv/bin/python -m bench.run --smoke --out-dir DIR          a few seconds of measuring

Parts, in this order (each also runs alone as python -m bench.<part>):
  pktcost       per-packet cost of each packet class (bench/pktcost.py)
  scaling       how that cost grows with backends, VIPs, a full connection table
  controlplane  Maglev builds, ring pushes, RPC latency, RPC return to first packet
  quality       Maglev balance and disruption, beside the Maglev paper
  traffic       veth forwarding rate and new connections per second, LB against an
                XDP_TX reflector (bench/traffic.py,
                when it is there; a part that is missing is recorded as skipped)
  prober        the health prober's CPU for 1 to 4096 targets, and in the namespace testbed
                the time from a backend's server stopping (starting) to the table without
                (with) it (bench/prober.py)
  metrics       one Prometheus scrape at 512 VIPs x 4096 backends (bench/metrics.py)

Results go to bench/results/results.json (--out-dir to change) and the plots
beside it. Timing parts run one after another, never side by side. Compiling
a balancer takes 5-8 s here, so --quick and --smoke compile fewer: the harness
is loaded once for pktcost and scaling; pktcost leaves out its SYN into a full
connection table (scaling's full-table points measure that case); scaling uses
one balancer (its full-table points last) and the control plane uses it after
it. The full run gives each part its own programs, as when it runs alone."""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path

from . import common, plots
from .balancer import Loaded
from .common import RESULTS_DIR

# retransmits per iperf3 run below which a ratio against direct says nothing (direct alone: 0 - 350)
RETRANSMITS_NOISE = 50
PARTS = ("pktcost", "scaling", "controlplane", "quality", "traffic", "prober", "metrics")

MODES = {
    "full": {
        "pktcost": {"repeat": 1_000_000, "rounds": 5, "full_table": True},
        "scaling": {"repeat": 300_000, "rounds": 7, "shared": False},
        "controlplane": "FULL",
        "quality": {"quick": False},
        "traffic": {"quick": False},
        "prober": {"targets": (1, 100, 1000, 4096), "seconds": 10.0, "rounds": 4},
        "metrics": {"vips": 512, "per_vip": 8, "rounds": 5},
    },
    "quick": {
        # no second balancer for pktcost's SYN into a full table: scaling measures that case
        "pktcost": {"repeat": 100_000, "rounds": 3, "full_table": False},
        "scaling": {"repeat": 50_000, "rounds": 3, "shared": True},
        "controlplane": "QUICK",
        "quality": {"quick": True},
        "traffic": {"quick": True},
        "prober": {"targets": (1, 1000, 4096), "seconds": 3.0, "rounds": 2},
        "metrics": {"vips": 512, "per_vip": 8, "rounds": 3},
    },
    "smoke": {
        "pktcost": {"repeat": 2_000, "rounds": 1, "full_table": False},
        "scaling": {"repeat": 2_000, "rounds": 1, "shared": True},
        "controlplane": "SMOKE",
        "quality": {"ns": (10, 100), "ks": (1, 10), "trials": 1},
        "traffic": None,  # a namespace testbed takes ~15 s: tests/bench/test_traffic.py covers it
        # no failover rounds: a namespace testbed takes ~15 s (tests/e2e/test_health_watch.py covers the path)
        "prober": {"targets": (1, 100), "seconds": 0.5, "rounds": 0},
        "metrics": {"vips": 8, "per_vip": 2, "rounds": 1},
    },
}


def machine() -> dict:
    m = common.machine()
    m["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    m["hostname"] = socket.gethostname()
    m["os"] = platform.platform()
    return m


class Context:
    """What the parts share in one run: the console, the mode, and (but in the full
    run) the loaded programs: the harness, scaling's balancer for the control plane."""

    def __init__(self, mode: str, console, cpu: int | None):
        self.mode, self.cfg, self.console, self.cpu = mode, MODES[mode], console, cpu
        self.loaded = Loaded() if mode != "full" else None

    def log(self, msg: str) -> None:
        self.console.print(msg, highlight=False)

    def close(self) -> None:
        if self.loaded is not None:
            self.loaded.close()


# ---- the parts -----------------------------------------------------------------------------

def part_pktcost(ctx: Context) -> dict:
    from . import pktcost  # noqa: PLC0415

    c = ctx.cfg["pktcost"]
    return pktcost.run(c["repeat"], c["rounds"], None, ctx.cpu, console=ctx.console,
                       full_table=c["full_table"], loaded=ctx.loaded)


def part_scaling(ctx: Context) -> dict:
    from . import scaling  # noqa: PLC0415

    c = ctx.cfg["scaling"]
    return scaling.run(c["repeat"], c["rounds"], None, ctx.cpu, console=ctx.console,
                       shared_table=c["shared"], loaded=ctx.loaded)


def part_controlplane(ctx: Context) -> dict:
    from . import controlplane  # noqa: PLC0415

    return controlplane.run(ctx.cfg["controlplane"], log=ctx.log, loaded=ctx.loaded)


def part_quality(ctx: Context) -> dict:
    from . import quality  # noqa: PLC0415

    return quality.run(log=ctx.log, console=ctx.console, **ctx.cfg["quality"])


def part_prober(ctx: Context) -> dict:
    from . import prober  # noqa: PLC0415

    return prober.run(log=ctx.log, **ctx.cfg["prober"])


def part_metrics(ctx: Context) -> dict:
    from . import metrics  # noqa: PLC0415

    return metrics.run(log=ctx.log, **ctx.cfg["metrics"])


def part_traffic(ctx: Context) -> dict:
    """The hook for bench/traffic.py: run(quick=..., count=..., say=...) -> dict."""
    if importlib.util.find_spec("bench.traffic") is None:
        return {"skipped": "bench/traffic.py is not there"}
    if ctx.cfg["traffic"] is None:
        return {"skipped": f"left out in {ctx.mode} mode (tests/bench/test_traffic.py runs it)"}
    from . import traffic  # noqa: PLC0415

    return traffic.run(say=ctx.log, **ctx.cfg["traffic"])


RUNNERS = {"pktcost": part_pktcost, "scaling": part_scaling, "controlplane": part_controlplane,
           "quality": part_quality, "traffic": part_traffic, "prober": part_prober,
           "metrics": part_metrics}


# ---- the summary -----------------------------------------------------------------------------

def headlines(results: dict) -> list[dict]:
    """The figures the summary table shows: what, value, target, met."""
    rows: list[dict] = []

    def add(part, what, value, target="", met=None):
        rows.append({"part": part, "what": what, "value": value, "target": target, "met": met})

    pk = results.get("pktcost")
    if isinstance(pk, dict) and "summary" in pk:
        s = pk["summary"]
        add("pktcost", "established, net ns (median)",
            f"{s['cases']['established']['net_ns']['median']:.0f}")
        if "syn_ack" in s["cases"]:
            add("pktcost", "the first ACK after a SYN (its entry moves from the SYN table into "
                "the connection table), net ns (median)",
                f"{s['cases']['syn_ack']['net_ns']['median']:.0f}")
        for name, r in s["ratios"].items():
            g = r["gross"]["median"]
            net = r.get("net")
            add("pktcost", name + " (gross" + (", net" if net else "") + ")",
                f"{g:.2f}" + (f" ({net['median']:.2f})" if net else ""),
                f"<= {r['target']:g}", g <= r["target"])
    sc = results.get("scaling")
    if isinstance(sc, dict) and "summary" in sc:
        s = sc["summary"]
        for dim, span in (("backends", "1 -> 4096 backends"), ("vips", "1 -> 512 VIPs")):
            for kind, f in s["flat"][dim].items():
                dev = f["largest_deviation"]["net"]
                add("scaling", f"{span}, {kind}: largest change, net (fastest / median)",
                    f"±{dev['min'] * 100:.1f}% / ±{dev['median'] * 100:.1f}%", "within ±10%",
                    f["within_10pct"]["net"]["min"])
        for kind, r in s["ratios"]["conntrack"]["full"].items():
            add("scaling", f"connection table full / empty, {kind}, net (fastest / median)",
                f"x{r['net']['min']:.2f} / x{r['net']['median']:.2f}")
    cp = results.get("controlplane")
    if isinstance(cp, dict) and "maglev" in cp:
        for b in cp["maglev"]:
            if b["backends"] == 1000 and b["ring_size"] == 65537:
                add("controlplane", "Maglev table N=1000 M=65537, indices, ms (min)",
                    f"{b['min_ms']:.2f}", "<= 10 ms", b["min_ms"] <= 10)
                add("controlplane", "maglev_table N=1000 M=65537, addresses out, ms (min / median)",
                    f"{b['table_min_ms']:.2f} / {b['table_median_ms']:.2f}", "<= 5 ms",
                    b["table_median_ms"] <= 5)
        rp = cp["ring_push"]
        add("controlplane", "one full ring into the kernel, ms (min)",
            f"{rp['whole_ring_min_ms']:.3f}", "<= 1 ms", rp["whole_ring_min_ms"] <= 1)
        for kind in ("AddBackends", "SetBackendWeights"):
            r = cp["rpc"]["1"][kind]
            add("controlplane", f"{kind}, VIP with 100 backends, p50 ms", f"{r['p50_ms']:.2f}",
                "<= 5 ms" if kind == "AddBackends" else "", r["p50_ms"] <= 5
                if kind == "AddBackends" else None)
        rtp = cp.get("rpc_to_packet", {})
        for kind in ("AddBackends", "SetBackendWeights"):
            if kind in rtp:
                r = rtp[kind]
                add("controlplane", f"{kind} return -> first packet on the new table, us (p50)",
                    f"{r['first_run_us']['p50']:.1f}, runs needed: max {r['runs_needed']['max']}",
                    "1 run", r["runs_needed"]["max"] == 1)
    q = results.get("quality")
    if isinstance(q, dict) and "balance" in q:
        for b, d in zip(q["balance"], q["disruption"]):
            if b["backends"] == max(x["backends"] for x in q["balance"]):
                add("quality", f"max/mean entries, N={b['backends']} M={b['ring_size']}",
                    f"{b['max_over_mean']:.4f}", f"<= {b['bound_max_over_mean']:.4f} (one entry)",
                    b["max_over_mean"] <= b["bound_max_over_mean"] + 1e-12)
                add("quality", f"one of N={b['backends']} leaves, M={b['ring_size']}: changed",
                    f"{d['one_leaves']['changed_mean'] * 100:.2f}%",
                    f"ideal {d['one_leaves']['ideal_mean'] * 100:.2f}%")
    tr = results.get("traffic")
    if isinstance(tr, dict):
        if "skipped" in tr:
            add("traffic", "veth rate, LB / XDP_TX reflector", "skipped: " + tr["skipped"])
        elif "ratio" in tr:
            add("traffic", "veth rate, LB / XDP_TX reflector", f"{tr['ratio']:.2f}", ">= 0.5",
                tr["ratio"] >= 0.5)
        if "connections" in tr:
            c = tr["connections"]
            add("traffic", "new connections (SYNs of new flows) per second, LB / XDP_TX reflector",
                f"{c['ratio']:.2f} ({c['balancer']['returned_pps'] / 1e6:.2f} / "
                f"{c['reflector']['returned_pps'] / 1e6:.2f} M/s)", "", None)
        for streams in (1, 4):
            case = (tr.get("iperf3") or {}).get(f"P{streams}")
            if not case:
                continue
            add("traffic", f"iperf3 TCP -P {streams}, through the LB / direct (median, min-max)",
                f"{case['ratio_median']:.2f} ({case['ratio_min']:.2f}-{case['ratio_max']:.2f})", ">= 0.9",
                case["ratio_median"] >= 0.9)
            lb, direct = statistics.median(case["lb_retransmits"]), statistics.median(case["direct_retransmits"])
            add("traffic", f"iperf3 TCP -P {streams}, retransmits per run, LB / direct (median)",
                f"{lb:g} / {direct:g}", "<= 2x direct or <= 50", lb <= max(2 * direct, RETRANSMITS_NOISE))
    pr = results.get("prober")
    if isinstance(pr, dict) and "rows" in pr:
        for r in pr["rows"]:
            add("prober", f"health probes, {r['targets']} backends every {r['interval_s']:g} s: CPU of one core",
                f"{100 * r['cpu_share_of_one_core']:.1f}%", "<= 25% at 4096" if r["targets"] == 4096 else "",
                r["cpu_share_of_one_core"] <= 0.25 if r["targets"] == 4096 else None)
        fo = pr.get("failover")
        if fo and fo.get("down_s"):
            c = fo["check"]
            add("prober", f"server stopped -> table without it, s (max / median; fall {c['fall']} x "
                f"{c['interval']:g} s, timeout {c['timeout']:g} s)",
                f"{fo['down_max_s']:.2f} / {fo['down_median_s']:.2f}",
                f"<= {fo['down_target_s']:.2f} s", fo["down_max_s"] <= fo["down_target_s"])
            add("prober", f"server back -> table with it, s (max / median; rise {c['rise']} x {c['interval']:g} s)",
                f"{fo['up_max_s']:.2f} / {fo['up_median_s']:.2f}", f"<= {fo['up_target_s']:.2f} s",
                fo["up_max_s"] <= fo["up_target_s"])
    me = results.get("metrics")
    if isinstance(me, dict) and "rows" in me:
        for r in me["rows"]:
            add("metrics", f"one Prometheus scrape, {r['vips']} VIPs x {r['backends']} backends "
                f"({r['series']} series), min / median", f"{r['scrape_ms_min']:.0f} / {r['scrape_ms_median']:.0f} ms")
    for part in PARTS:
        err = results.get(part, {}).get("error") if isinstance(results.get(part), dict) else None
        if err:
            add(part, "FAILED", err.splitlines()[-1][:100])
    return rows


def render_summary(console, rows: list[dict], title: str) -> None:
    t = common.table(title, [("part", "left"), ("figure", "left"), "value", "target",
                             ("met", "center")])
    for r in rows:
        met = "" if r["met"] is None else ("[green]yes[/green]" if r["met"] else "[red]NO[/red]")
        t.add_row(r["part"], r["what"], r["value"], r["target"], met)
    console.print(t)


# ---- the command -------------------------------------------------------------------------------

def run(mode: str = "full", out_dir: Path = RESULTS_DIR, skip=(), cpu: int | None = None,
        console=None) -> dict:
    from rich.console import Console  # noqa: PLC0415

    # a log file or a pipe gets 140 columns rather than rich's 80
    console = console or Console(width=None if sys.stdout.isatty() else 140)
    started = time.time()
    ctx = Context(mode, console, cpu)
    parts = [p for p in PARTS if p not in skip]
    results: dict = {"benchmark": "l4lb", "mode": mode, "machine": machine(),
                     "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                     "settings": json.loads(json.dumps(MODES[mode])), "parts": {}}
    try:
        for i, part in enumerate(parts, 1):
            console.rule(f"[bold][{i}/{len(parts)}] {part}[/bold]  "
                         f"({time.time() - started:.0f} s elapsed)")
            t0 = time.time()
            try:
                res = RUNNERS[part](ctx)
                ok = bool(res.get("ok", True)) if isinstance(res, dict) else True
            except Exception as e:  # a part that fails leaves the others their run
                res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                ok = False
                console.print(f"[red]{part} failed: {e}[/red]")
            results[part] = res
            results["parts"][part] = {"duration_s": round(time.time() - t0, 1), "ok": ok,
                                      "skipped": isinstance(res, dict) and "skipped" in res}
            console.print(f"{part}: {time.time() - t0:.1f} s"
                          + ("" if ok else " [red](proofs or checks failed)[/red]"))
    finally:
        ctx.close()
    for part in skip:
        results[part] = {"skipped": "--skip"}
        results["parts"][part] = {"duration_s": 0, "ok": True, "skipped": True}

    console.rule("[bold]results[/bold]")
    results["summary"] = headlines(results)
    results["ok"] = all(p["ok"] for p in results["parts"].values())
    json_path = out_dir / "results.json"
    try:
        results["plots"] = [p.name for p in plots.make_all(results, out_dir)]
    except Exception as e:  # the numbers matter more than the pictures
        results["plots"] = []
        results["plots_error"] = f"{type(e).__name__}: {e}"
        console.print(f"[red]plotting failed: {e}[/red]")
    results["duration_s"] = round(time.time() - started, 1)
    common.write_json(json_path, results, indent=1)
    render_summary(console, results["summary"],
                   f"l4lb benchmark ({mode}, {results['duration_s']:.0f} s) - "
                   f"{results['machine']['cpu_model']}, {results['machine']['cores']} cores, "
                   f"kernel {results['machine']['kernel']}")
    console.print(f"wrote {json_path}")
    for p in results["plots"]:
        console.print(f"wrote {out_dir / p}")
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0],
                                 epilog="parts: " + ", ".join(PARTS))
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="fewer repeats and rounds: under a minute")
    g.add_argument("--smoke", action="store_true",
                   help="tiny repeats, one round: checks that everything runs (tests)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR,
                    help="where results.json and the plots go (default bench/results)")
    ap.add_argument("--skip", action="append", default=[], choices=PARTS, metavar="PART",
                    help="leave a part out (repeatable)")
    ap.add_argument("--cpu", type=int, help="CPU for the per-packet parts (default: the last)")
    args = ap.parse_args(argv)
    mode = "quick" if args.quick else "smoke" if args.smoke else "full"
    return common.run_command("bench.run", lambda: run(mode, args.out_dir, tuple(args.skip),
                                                       args.cpu))


if __name__ == "__main__":
    sys.exit(main())
