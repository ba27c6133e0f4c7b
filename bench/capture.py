"""What `l4lb capture` costs the data plane: the established-TCP case of
bench/pktcost.py (a connection-table hit, encapsulated, through the harness)
with capture off, and while a capture runs: one that selects another VIP (the
filter check alone), one that selects this packet with nobody reading fast
enough (the ring full: every copy is lost and counted), and one that selects
it with the ring drained between runs (two copies per packet, as received
and as sent, at the full snap length). Rounds interleave the four; each
figure is the net ns and its ratio to capture off within the same round.
`python -m bench.pktcost --against main` gives capture off against today's
program.

    python -m bench.capture [--rounds 7] [--repeat 200000]
"""
from __future__ import annotations

import argparse
import json
import statistics

from l4lb import consts

from .pktcost import PktCost

DRAINED_REPEAT = 1000  # copies that fit the ring (two per packet), drained between runs
ALL = sum(1 << v for v in consts.CAPTURE_VERDICTS.values())


def run(rounds: int = 7, repeat: int = 200_000, log=print) -> dict:
    pc = PktCost(repeat, only=frozenset({"established"}))
    try:
        case = pc.case("established")
        dp = pc.lbs["main"].dp
        vip_id = pc.lbs["main"].lbstate.vips[case.vip].vip_id
        records: list = []
        reader = dp.capture_reader(records.append)
        modes = {
            "off": None,
            "on, another VIP selected": (vip_id + 2, 0, ALL, consts.CAPTURE_SNAP_MAX),
            "on, this VIP, ring full (copies lost)": (vip_id + 1, 0, ALL, consts.CAPTURE_SNAP_MAX),
            "on, this VIP, ring drained": (vip_id + 1, 0, ALL, consts.CAPTURE_SNAP_MAX),
        }
        net: dict[str, list[int]] = {m: [] for m in modes}
        lost: dict[str, int] = {}
        for rnd in range(1, rounds + 1):
            for mode, sel in modes.items():
                drained = mode.endswith("drained")
                reader.consume()
                records.clear()
                lost0 = dp.capture_counts()["lost"]
                if sel:
                    dp.capture_start(*sel)
                pc.repeat = DRAINED_REPEAT if drained else repeat
                try:
                    r = pc.measure(case, rnd)
                finally:
                    dp.capture_stop()
                    pc.repeat = repeat
                if r.failures:
                    raise RuntimeError(f"{mode}: {'; '.join(r.failures)}")
                reader.consume()
                lost[mode] = lost.get(mode, 0) + dp.capture_counts()["lost"] - lost0
                # the round's direct runs (priming, the expected output) are copied too
                if drained and (len(records) < 2 * DRAINED_REPEAT or lost[mode]):
                    raise RuntimeError(f"{mode}: {len(records)} copies, {lost[mode]} lost; every one of "
                                       f"{2 * DRAINED_REPEAT} was expected in the ring")
                net[mode].append(r.net_ns)
            log(f"  capture round {rnd}: " + ", ".join(f"{m}: {v[-1]} ns" for m, v in net.items()))
        reader.close()
        rows = []
        for mode, values in net.items():
            ratios = [v / o for v, o in zip(values, net["off"])]
            rows.append({"mode": mode, "net_ns_min": min(values), "net_ns_median": statistics.median(values),
                         "ratio_to_off": {"min": min(ratios), "median": statistics.median(ratios),
                                          "max": max(ratios)},
                         "copies_lost": lost.get(mode, 0)})
            log(f"  {mode:40s} net {min(values):4d} / {statistics.median(values):6.1f} ns (min / median), "
                f"ratio to off {min(ratios):.2f} / {statistics.median(ratios):.2f} / {max(ratios):.2f}, "
                f"copies lost {lost.get(mode, 0)}")
        return {"benchmark": "capture", "case": "established", "repeat": repeat,
                "drained_repeat": DRAINED_REPEAT, "rounds": rounds, "rows": rows}
    finally:
        pc.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=200_000)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    res = run(args.rounds, args.repeat, log=lambda line: print(line, flush=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
