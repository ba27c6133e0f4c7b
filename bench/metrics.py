"""What a Prometheus scrape of `l4lb run --metrics-listen` costs at the
capacity README.md documents the label cardinality for: 512 VIPs over 4096
backend addresses (8 each), every series read from the maps at scrape time.
The figure is the time to produce the whole exposition (the collector's map
reads, summed over CPUs, and prometheus_client's text output), with the
number of series and bytes it holds.

    python -m bench.metrics                       # 512 VIPs x 8 backends, 5 rounds
    python -m bench.metrics --vips 64 --per-vip 4 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from prometheus_client import generate_latest

from control.metrics import Exporter
from l4lb import bpf, consts
from l4lb.controller import Controller
from l4lb.dataplane import Dataplane, RuntimeConfig
from l4lb.model import VipKey


def _backend(i: int) -> str:
    return f"198.18.{2 + i // 250}.{1 + i % 250}"  # 198.18.2.1 - 198.18.18.96 for 4096


def run(vips: int = 512, per_vip: int = 8, rounds: int = 5, log=print) -> dict:
    cap = consts.Capacity(max_vips=max(vips, 1), max_backends=max(vips * per_vip, 1), ct_size=65536,
                          ring_size=4099)
    prog = bpf.load_balancer(cap)
    try:
        ctrl = Controller(Dataplane(prog, cap), RuntimeConfig())
        ctrl.dp.clear()
        t0 = time.perf_counter()
        for v in range(vips):
            key = VipKey.parse(f"198.18.10.{v % 250}", 1000 + v // 250, "tcp")
            ctrl.add_vip(key, [], [(_backend(v * per_vip + j), 1) for j in range(per_vip)])
        log(f"  metrics: {vips} VIPs, {vips * per_vip} backends configured in {time.perf_counter() - t0:.1f} s")
        exp = Exporter("127.0.0.1", 0)
        exp.start_collecting(ctrl, prog)
        times, text = [], b""
        for _ in range(rounds):
            t = time.perf_counter()
            text = generate_latest(exp.registry)
            times.append(time.perf_counter() - t)
        series = sum(1 for line in text.decode().splitlines() if line and not line.startswith("#"))
        row = {"vips": vips, "backends": vips * per_vip, "series": series, "bytes": len(text),
               "scrape_ms_min": 1000 * min(times), "scrape_ms_median": 1000 * statistics.median(times)}
        log(f"  metrics: one scrape of {series} series ({len(text) / 1024:.0f} KiB): "
            f"{row['scrape_ms_min']:.0f} ms min, {row['scrape_ms_median']:.0f} ms median over {rounds}")
        exp.close()
        return {"benchmark": "metrics", "rows": [row]}
    finally:
        prog.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vips", type=int, default=512)
    ap.add_argument("--per-vip", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    res = run(args.vips, args.per_vip, args.rounds, log=lambda line: print(line, flush=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
