"""Maglev table quality: balance and disruption, at the Maglev paper's table sizes.

    .venv/bin/python -m bench.quality [--quick] [--out PATH]

Tables are built by l4lb.maglev exactly as the control plane builds them (all
weights 1), from the backends' addresses (198.18.32.0/19).

balance     max / mean (and min / mean) entries per backend. Maglev's fill gives
            every backend one turn per round until the table is full, so the
            counts can differ by one at most: max / mean <= ceil(M/N) / (M/N).
disruption  the share of the M entries that name another backend
            - after one backend leaves (ideal: only its own entries, about 1/N),
            - after one joins (ideal: only the entries it takes, about 1/(N+1)),
            - after k of N=1000 backends leave at once (ideal: k/N), the
              experiment of the paper's resilience figure.
            Which backend leaves is drawn at random (fixed seed), several times;
            mean and max over those trials are reported, with `excess` = changed
            entries beyond the ideal, as a share of the table.

The paper (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
Balancer", NSDI 2016) evaluates both at N = 1000 backends with M = 65537 and
M = 655373; it reports them as figures, not tables. What it says, which this
benchmark sets beside its own numbers (PAPER below), is given qualitatively."""
from __future__ import annotations

import argparse
import ipaddress
import math
import sys
import time
from pathlib import Path

import numpy as np

from l4lb import maglev

from .common import RESULTS_DIR, pool, table as rich_table, utc_now, write_json

SIZES = (65537, 655373)
FULL_N = (10, 20, 50, 100, 200, 500, 1000)
QUICK_N = (10, 100, 1000)
FAILURE_N = 1000
FULL_K = (1, 2, 5, 10, 20, 50, 100)  # 0.1% .. 10% of 1000
QUICK_K = (1, 10, 100)
FULL_TRIALS = 20
QUICK_TRIALS = 2
SEED = 20160316  # fixed: the same backends leave in every run
DEFAULT_OUT = RESULTS_DIR / "quality.json"
WEIGHT_SETS = ((65535, 65534), (65535, 1), (65535,) * 9 + (1,), (1, 2, 3))  # extreme and small

PAPER = {
    "source": "D. E. Eisenbud et al., Maglev: A Fast and Reliable Software Network Load "
              "Balancer, NSDI 2016",
    "setup": "evaluation of consistent hashing: N = 1000 backends, lookup tables of "
             "M = 65537 and M = 655373 entries, against Karger and Rendezvous hashing",
    "balance": "Maglev hashing balances almost perfectly at both table sizes (entries per "
               "backend, shown as a figure); Karger and Rendezvous hashing need backends "
               "overprovisioned substantially at M = 65537, less at M = 655373. By "
               "construction (backends take turns) entry counts differ by at most one, and "
               "the paper advises M > 100 x N to keep the difference in hash space between "
               "backends near 1%.",
    "disruption": "Figure of changed table entries against the share of backends failing "
                  "at once (N = 1000, repeated random trials): the changed share grows with "
                  "the number of failures and stays lower with the larger table (M = 655373). "
                  "Maglev gives up minimal disruption for balance; the connection table "
                  "protects established flows from the extra changes.",
    "numbers": "none quoted here: the paper shows these results as plots",
}


def backends(n: int) -> list[bytes]:
    return [ipaddress.IPv4Address(a).packed for a in pool(n)]


def table(keys: list[bytes], m: int) -> np.ndarray:
    """Positions into keys, one per entry."""
    return maglev.maglev_indices(keys, [1] * len(keys), m)


def balance(n: int, m: int) -> dict:
    t = table(backends(n), m)
    counts = np.bincount(t, minlength=n)
    mean = m / n
    return {"backends": n, "ring_size": m, "max": int(counts.max()), "min": int(counts.min()),
            "max_over_mean": float(counts.max() / mean),
            "min_over_mean": float(counts.min() / mean),
            "bound_max_over_mean": math.ceil(m / n) / mean,
            "within_one_entry": bool(counts.max() - counts.min() <= 1)}


def weighted_balance(weights: tuple[int, ...], m: int) -> dict:
    """Largest gap between a backend's entries and its exact share m * w / sum(w)."""
    counts = np.bincount(maglev.maglev_indices(backends(len(weights)), list(weights), m), minlength=len(weights))
    err = np.abs(counts - m * np.asarray(weights) / sum(weights)).max()
    return {"weights": list(weights), "ring_size": m, "entries": counts.tolist(),
            "max_share_error_entries": float(err), "max_share_error": float(err / m)}


def _changed_after_removal(keys, base, gone: list[int], m: int) -> tuple[float, float]:
    """(changed share, ideal share) when the backends at positions `gone` leave."""
    gone_set = set(gone)
    keep = [i for i in range(len(keys)) if i not in gone_set]
    after = np.asarray(keep, dtype=np.int64)[table([keys[i] for i in keep], m)]
    changed = float(np.mean(after != base))
    ideal = float(np.isin(base, gone).mean())  # the leavers' own entries must move
    return changed, ideal


def _summary(changed: list[float], ideal: list[float], nominal: float) -> dict:
    excess = [c - i for c, i in zip(changed, ideal)]
    return {"changed_mean": float(np.mean(changed)), "changed_max": float(np.max(changed)),
            "ideal_mean": float(np.mean(ideal)), "nominal_ideal": nominal,
            "excess_mean": float(np.mean(excess)),
            "changed_over_ideal": float(np.mean(changed) / np.mean(ideal)),
            "trials": len(changed)}


def disruption(n: int, m: int, trials: int, rng: np.random.Generator) -> dict:
    keys = backends(n + 1)
    base_keys = keys[:n]
    base = table(base_keys, m)
    # one leaves
    ch, ide = [], []
    for who in rng.choice(n, size=min(trials, n), replace=False):
        c, i = _changed_after_removal(base_keys, base, [int(who)], m)
        ch.append(c)
        ide.append(i)
    leave = _summary(ch, ide, 1 / n)
    # one joins (the newcomer is a fixed next address: one trial suffices, the table is
    # deterministic; its entries are the ideal)
    after = table(keys, m)
    joined = float(np.mean(after != base))
    takes = float(np.mean(after == n))
    join = _summary([joined], [takes], 1 / (n + 1))
    return {"backends": n, "ring_size": m, "one_leaves": leave, "one_joins": join}


def failures(n: int, m: int, ks, trials: int, rng: np.random.Generator) -> list[dict]:
    keys = backends(n)
    base = table(keys, m)
    out = []
    for k in ks:
        ch, ide = [], []
        for _ in range(trials):
            gone = [int(x) for x in rng.choice(n, size=k, replace=False)]
            c, i = _changed_after_removal(keys, base, gone, m)
            ch.append(c)
            ide.append(i)
        out.append({"backends": n, "ring_size": m, "failed": k, "failed_share": k / n,
                    **_summary(ch, ide, k / n)})
    return out


def run(quick: bool = False, log=print, sizes=SIZES, ns=None, ks=None, trials=None,
        console=None) -> dict:
    """Every table of the settings; shows the results' tables on `console` if given."""
    started = time.time()
    ns = ns or (QUICK_N if quick else FULL_N)
    ks = ks or (QUICK_K if quick else FULL_K)
    trials = trials or (QUICK_TRIALS if quick else FULL_TRIALS)
    rng = np.random.default_rng(SEED)
    res = {"benchmark": "quality",
           "date": utc_now(),
           "settings": {"ring_sizes": list(sizes), "backends": list(ns), "trials": trials,
                        "failures_at": FAILURE_N, "failed": list(ks), "seed": SEED,
                        "weights": "all 1", "backend_pool": "198.18.32.0/19",
                        "fill": "C" if maglev.accelerated() else "pure Python"},
           "method": __doc__.split("\n\n", 2)[2].strip(),
           "balance": [], "disruption": [], "failures": [], "paper": PAPER}
    for m in sizes:
        for n in ns:
            b = balance(n, m)
            d = disruption(n, m, trials, rng)
            res["balance"].append(b)
            res["disruption"].append(d)
            log(f"  maglev M={m} N={n}: max/mean {b['max_over_mean']:.4f} "
                f"(bound {b['bound_max_over_mean']:.4f}); one leaves: "
                f"{d['one_leaves']['changed_mean'] * 100:.2f}% changed "
                f"(ideal {d['one_leaves']['ideal_mean'] * 100:.2f}%); one joins: "
                f"{d['one_joins']['changed_mean'] * 100:.2f}% "
                f"(ideal {d['one_joins']['ideal_mean'] * 100:.2f}%)")
        f = failures(FAILURE_N, m, ks, trials, rng)
        res["failures"] += f
        log(f"  maglev M={m} N={FAILURE_N}, k fail at once: " + ", ".join(
            f"k={x['failed']}: {x['changed_mean'] * 100:.2f}% (ideal {x['ideal_mean'] * 100:.2f}%)"
            for x in f))
    res["weighted"] = [weighted_balance(w, m) for m in (251, *sizes) for w in WEIGHT_SETS]
    for x in res["weighted"]:
        log(f"  maglev M={x['ring_size']} weights {x['weights']}: entries off the exact share by "
            f"{x['max_share_error_entries']:.2f} at most ({x['max_share_error'] * 100:.3f}% of the table)")
    res["ok"] = all(b["within_one_entry"] for b in res["balance"]) and all(
        x["max_share_error_entries"] < 1 for x in res["weighted"])
    res["duration_s"] = round(time.time() - started, 1)
    if console is not None:
        render(console, res)
    return res


def render(console, res: dict) -> None:
    t = rich_table("Maglev quality (this implementation; the paper: see notes below)",
                   ("M", "N", "max/mean", "bound", "one leaves: changed", "ideal",
                    "one joins: changed", "ideal"))
    for b, d in zip(res["balance"], res["disruption"]):
        t.add_row(str(b["ring_size"]), str(b["backends"]), f"{b['max_over_mean']:.4f}",
                  f"{b['bound_max_over_mean']:.4f}",
                  f"{d['one_leaves']['changed_mean'] * 100:.2f}%",
                  f"{d['one_leaves']['ideal_mean'] * 100:.2f}%",
                  f"{d['one_joins']['changed_mean'] * 100:.2f}%",
                  f"{d['one_joins']['ideal_mean'] * 100:.2f}%")
    console.print(t)
    f = rich_table(f"k of {FAILURE_N} backends fail at once: share of entries changed",
                   ("M", "k", "changed (mean)", "changed (max)", "ideal k/N"))
    for x in res["failures"]:
        f.add_row(str(x["ring_size"]), str(x["failed"]), f"{x['changed_mean'] * 100:.2f}%",
                  f"{x['changed_max'] * 100:.2f}%", f"{x['ideal_mean'] * 100:.2f}%")
    console.print(f)
    console.print(f"[dim]paper ({res['paper']['setup']}): {res['paper']['balance']} "
                  f"{res['paper']['disruption']}[/dim]")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quality",
                                 description="Maglev balance and disruption.")
    ap.add_argument("--quick", action="store_true",
                    help=f"N in {QUICK_N}, {QUICK_TRIALS} trials")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="JSON results (default bench/results/quality.json)")
    args = ap.parse_args(argv)
    from rich.console import Console  # noqa: PLC0415

    console = Console()
    console.print("Maglev quality:")
    res = run(args.quick, log=console.print, console=console)
    write_json(args.out, res)
    console.print(f"wrote {args.out}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
