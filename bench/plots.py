"""PNG plots of the benchmark's results (bench/results/results.json): cost per
packet class, cost against backends, VIPs and a full connection table, Maglev
balance and disruption. matplotlib (the dev extras) with the Agg backend: no
display needed.

    .venv/bin/python -m bench.plots [RESULTS_JSON] [--out-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"established": "#4c72b0", "established_spread": "#55a868", "syn": "#c44e52"}
RING_COLORS = {65537: "#4c72b0", 655373: "#dd8452"}


def _subtitle(results: dict) -> str:
    m = results.get("machine", {})
    return f"{m.get('cpu_model', '?')}, {m.get('cores', '?')} cores, kernel {m.get('kernel', '?')}"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pktcost(results: dict, path: Path) -> Path:
    """Net and gross cost per packet class: bars at the median, ticks at the min."""
    pk = results["pktcost"]
    s = pk["summary"]["cases"]
    names = [c["name"] for c in pk["cases"]]
    net_med = [s[n]["net_ns"]["median"] if "net_ns" in s[n] else 0 for n in names]
    gross_med = [s[n]["gross_ns"]["median"] for n in names]
    gross_min = [s[n]["gross_ns"]["min"] for n in names]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(10, 5))
    ax.bar([i - 0.2 for i in x], gross_med, width=0.4, color="#8da0cb",
           label="gross (net + a plain XDP_DROP program), median")
    ax.bar([i + 0.2 for i in x], net_med, width=0.4, color="#4c72b0",
           label="net (beyond the harness), median")
    ax.scatter([i - 0.2 for i in x], gross_min, marker="_", s=300, color="black", zorder=3,
               label="gross, min")
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_ylabel("ns per packet")
    st = pk["settings"]
    ax.set_title(f"l4lb: cost per packet class (BPF_PROG_TEST_RUN, repeat {st['repeat']:,} x "
                 f"{st['rounds']} rounds)\n{_subtitle(results)}", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_scaling(results: dict, path: Path) -> Path:
    """Net cost against backends and VIPs (with the ±10% band around the first point) and
    against the connection table's fill."""
    sc = results["scaling"]
    pts = sc["summary"]["points"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [3, 3, 2]})
    for ax, dim, label in ((axes[0], "backends", "backends in the VIP's ring"),
                           (axes[1], "vips", "VIPs in the maps")):
        xs = [int(p) for p in pts[dim]]
        for kind, color in COLORS.items():
            med = [pts[dim][str(p)][kind]["net_ns"]["median"] for p in xs]
            low = [pts[dim][str(p)][kind]["net_ns"]["min"] for p in xs]
            ax.plot(xs, med, "o-", color=color, label=f"{kind} (median)")
            ax.plot(xs, low, "_", color=color, markersize=14)
            ax.fill_between(xs, med[0] * 0.9, med[0] * 1.1, color=color, alpha=0.12)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel(label)
        ax.set_ylabel("net ns per packet")
        ax.set_ylim(bottom=0)
        ax.set_title(f"cost vs {dim} (band: ±10% of the first median; ticks: fastest round)",
                     fontsize=9)
    axes[0].legend(fontsize=8)
    ax = axes[2]
    ct = pts["conntrack"]
    kinds = list(COLORS)
    for j, table in enumerate(ct):
        vals = [ct[table][k]["net_ns"]["median"] for k in kinds]
        ax.bar([i + (j - 0.5) * 0.4 for i in range(len(kinds))], vals, width=0.4,
               color=["#a6bddb", "#2b8cbe"][j], label=f"table {table}")
    ax.set_xticks(range(len(kinds)), kinds, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("net ns per packet")
    ax.set_title("connection table, median:\nonly the measured flows (empty) vs full",
                 fontsize=10)
    ax.legend(fontsize=8)
    st = sc["settings"]
    fig.suptitle(f"l4lb per-packet cost as the tables grow (repeat {st['repeat']:,} x "
                 f"{st['rounds']} rounds) - {_subtitle(results)}", fontsize=10)
    return _save(fig, path)


def plot_balance(results: dict, path: Path) -> Path:
    q = results["quality"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in sorted({b["ring_size"] for b in q["balance"]}):
        rows = [b for b in q["balance"] if b["ring_size"] == m]
        ns = [b["backends"] for b in rows]
        c = RING_COLORS.get(m)
        ax.plot(ns, [b["max_over_mean"] for b in rows], "o-", color=c, label=f"max / mean, M={m}")
        ax.plot(ns, [b["min_over_mean"] for b in rows], "v--", color=c, alpha=0.6,
                label=f"min / mean, M={m}")
        ax.plot(ns, [b["bound_max_over_mean"] for b in rows], ":", color="gray")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("backends N")
    ax.set_ylabel("entries per backend / mean")
    ax.set_title("Maglev balance (dotted: ceil(M/N) / (M/N), counts one entry apart)",
                 fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_disruption(results: dict, path: Path) -> Path:
    q = results["quality"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for m in sorted({d["ring_size"] for d in q["disruption"]}):
        rows = [d for d in q["disruption"] if d["ring_size"] == m]
        ns = [d["backends"] for d in rows]
        c = RING_COLORS.get(m)
        a1.plot(ns, [100 * d["one_leaves"]["changed_mean"] for d in rows], "o-", color=c,
                label=f"one leaves, M={m}")
        a1.plot(ns, [100 * d["one_joins"]["changed_mean"] for d in rows], "s--", color=c,
                label=f"one joins, M={m}")
    ns = sorted({d["backends"] for d in q["disruption"]})
    a1.plot(ns, [100 / n for n in ns], ":", color="black", label="ideal 1/N")
    a1.set_xscale("log")
    a1.set_yscale("log")
    a1.set_xlabel("backends N")
    a1.set_ylabel("ring entries changed, %")
    a1.set_title("Maglev disruption: one backend leaves or joins", fontsize=10)
    a1.legend(fontsize=8)
    for m in sorted({f["ring_size"] for f in q["failures"]}):
        rows = [f for f in q["failures"] if f["ring_size"] == m]
        a2.plot([100 * f["failed_share"] for f in rows], [100 * f["changed_mean"] for f in rows],
                "o-", color=RING_COLORS.get(m), label=f"M={m}")
    ks = sorted({100 * f["failed_share"] for f in q["failures"]})
    a2.plot(ks, ks, ":", color="black", label="ideal: the failed backends' share")
    n = q["settings"]["failures_at"]
    a2.set_xlabel(f"backends failing at once, % of N={n}")
    a2.set_ylabel("ring entries changed, %")
    a2.set_title(f"k of {n} backends fail at once (as the Maglev paper's resilience figure)",
                 fontsize=10)
    a2.legend(fontsize=8)
    return _save(fig, path)


PLOTS = {
    "pktcost": ("cost_per_packet_class.png", plot_pktcost),
    "scaling": ("cost_vs_backends_vips.png", plot_scaling),
    "quality": ("maglev_balance.png", plot_balance),
    "quality_disruption": ("maglev_disruption.png", plot_disruption),
}


def make_all(results: dict, out_dir: Path) -> list[Path]:
    """Every plot whose section is in the results; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, (name, fn) in PLOTS.items():
        section = key.split("_")[0]
        if isinstance(results.get(section), dict) and "skipped" not in results[section]:
            written.append(fn(results, out_dir / name))
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="?", type=Path,
                    default=Path(__file__).resolve().parent / "results" / "results.json")
    ap.add_argument("--out-dir", type=Path, help="default: beside the results")
    args = ap.parse_args(argv)
    results = json.loads(args.results.read_text())
    for p in make_all(results, args.out_dir or args.results.parent):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
