"""Where a SYN's time goes: the same SYN path with its connection-table bucket
in cache and out of it, for the working tree and another commit, interleaved.

    .venv/bin/python -m bench.syncache --against b82801c [--rounds 5] [--runs 20000] [--ct-size N]

"hot": the SYNs of 1,000 flows over and over (each SYN takes a fresh pick and
writes its flow's entry again, in a bucket or node that is in cache); "new":
every SYN a flow never seen (a bucket or node that the CPU has not touched for a
long while). Both through the harness, net of the harness alone on the same
frames; the table holds CT_SIZE flows. The difference between the two is what
the memory costs a new flow; the hot figure is the instructions."""
from __future__ import annotations

import argparse
import statistics

from l4lb import consts

from .balancer import VARY4, Balancer, pin_to_cpu, tcp4_frame
from .common import CLIENT4, VIP4
from .harness import Harness
from .pktcost import add_vips
from .ref import RefCode, worktree

CT_SIZE = 202_048  # the SYN case's table in `bench.pktcost --quick` on two CPUs
HOT_FLOWS = 1000


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", default="b82801c")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=20_000)
    ap.add_argument("--ct-size", type=int, default=CT_SIZE, help="flows the tables are sized for")
    args = ap.parse_args(argv)
    pin_to_cpu(None)
    ref = RefCode(args.against)
    harness = Harness()
    cap = consts.Capacity(max_vips=8, max_backends=64, ct_size=args.ct_size)
    lbs = {"working tree": Balancer(cap, add_vips, worktree()), args.against: Balancer(cap, add_vips, ref.code)}
    syn = tcp4_frame(CLIENT4, VIP4, "S", 40000)
    out = {(name, kind): [] for name in lbs for kind in ("hot", "new")}
    flow = 1 << 20
    try:
        for r in range(args.rounds):
            for name, lb in lbs.items():
                for kind in ("hot", "new"):
                    vary = VARY4.cycled(HOT_FLOWS) if kind == "hot" else VARY4
                    first = 0 if kind == "hot" else flow
                    harness.load_frame(syn, vary, first)
                    t = harness.time(lb.prog.fd, args.runs).kernel_ns
                    harness.load_frame(syn, vary, first)
                    alone = harness.time(harness.drop.fd, args.runs).kernel_ns
                    if kind == "new":
                        flow += args.runs
                    out[(name, kind)].append(t - alone)
            print(f"round {r + 1}: " + ", ".join(f"{n} {k} {v[-1]} ns" for (n, k), v in out.items()), flush=True)
        for kind in ("hot", "new"):
            new, old = out[("working tree", kind)], out[(args.against, kind)]
            ratios = sorted(a / b for a, b in zip(new, old))
            print(f"{kind}: net ns {statistics.median(new):.0f} / {statistics.median(old):.0f}, ratio min / median / "
                  f"max {ratios[0]:.2f} / {statistics.median(ratios):.2f} / {ratios[-1]:.2f}")
    finally:
        for lb in lbs.values():
            lb.close()
        harness.close()
        ref.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
