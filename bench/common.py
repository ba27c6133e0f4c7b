"""What every benchmark shares: the benchmark's address plan, the machine's
description, pinning to one CPU, min/median summaries, and the report's
output (JSON files, rich tables and progress bars, the root check)."""
from __future__ import annotations

import datetime
import importlib.metadata
import ipaddress
import json
import os
import platform
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from l4lb.errors import L4lbError

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# ---- the address plan: 198.18.0.0/15, fd00:198:18::/48, 02:... MACs ---------------------------

CLIENT_MAC = "02:00:00:00:00:0c"
LB_MAC = "02:00:00:00:01:01"
GW_MAC = "02:00:00:00:00:01"
CLIENT4 = "198.18.0.5"
VIP4 = "198.18.10.10"
# backends beyond a handful: 198.18.32.0/19 (4096 do not fit a /24)
POOL_BASE = int(ipaddress.IPv4Address("198.18.32.1"))
POOL_SIZE = 8190


def pool(n: int, start: int = 0) -> list[str]:
    """n distinct backend addresses of the pool, from its `start`-th on."""
    if start + n > POOL_SIZE:
        raise L4lbError(f"backend pool 198.18.32.0/19 has {POOL_SIZE} addresses, "
                        f"{start + n} asked")
    return [str(ipaddress.IPv4Address(POOL_BASE + i)) for i in range(start, start + n)]


# ---- the machine ----------------------------------------------------------------------------------

def possible_cpus() -> int:
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def pin_to_cpu(cpu: int | None) -> tuple[set[int], int]:
    """Moves this process to one CPU (the last allowed one by default): the
    harness's flow numbers, the per-CPU counters and the connection table's
    per-CPU LRU lists must all be the same CPU's. Returns (the affinity to
    restore, the CPU)."""
    saved = os.sched_getaffinity(0)
    allowed = sorted(saved)
    cpu = allowed[-1] if cpu is None else cpu
    if cpu not in allowed:
        raise L4lbError(f"CPU {cpu}: this process may run on CPUs {allowed}")
    os.sched_setaffinity(0, {cpu})
    return saved, cpu


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def machine() -> dict:
    """The machine the numbers come from: CPU, kernel, versions, the CPU's mitigations."""
    vulns = {}
    vdir = Path("/sys/devices/system/cpu/vulnerabilities")
    if vdir.is_dir():
        for f in sorted(vdir.iterdir()):
            try:
                vulns[f.name] = f.read_text().strip()
            except OSError:
                pass
    return {"cpu_model": _cpu_model(), "cores": os.cpu_count(), "possible_cpus": possible_cpus(),
            "kernel": platform.release(), "machine": platform.machine(),
            "python": platform.python_version(), "bcc": _version("bcc"),
            "cpu_vulnerabilities": vulns}


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---- summaries ------------------------------------------------------------------------------------

def minmed(values: Iterable[float]) -> dict[str, float]:
    """The fastest (noise on a shared machine only ever adds time) and the median."""
    values = list(values)
    return {"min": min(values), "median": statistics.median(values)}


# ---- the report -----------------------------------------------------------------------------------

def write_json(path: Path, data: dict, indent: int = 2) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent, default=str) + "\n")


def table(title: str, columns: Iterable[str | tuple[str, str]]) -> Table:
    """A rich table with these columns: a name (right-justified) or (name, justify)."""
    t = Table(title=title)
    for col in columns:
        name, justify = (col, "right") if isinstance(col, str) else col
        t.add_column(name, justify=justify)
    return t


def progress(console) -> Progress:
    """The progress bar of a timed part: gone from the console when the part ends."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)


def finish_report(console, report: dict, out: Path | None, render) -> None:
    """Shows a timed part's report (render(console, report)), writes it to `out` when
    given, and warns when any of its proofs (report["failures"]) failed."""
    render(console, report)
    if out:
        write_json(out, report)
        console.print(f"wrote {out}")
    if report["failures"]:
        console.print(f"[red]{len(report['failures'])} proof(s) failed: the timings above "
                      "are not trustworthy[/red]")


def is_root(command: str) -> bool:
    """True as root; otherwise says that `command` needs root."""
    if os.geteuid() == 0:
        return True
    print(f"{command} loads XDP programs: run it as root", file=sys.stderr)
    return False


def run_command(command: str, measure) -> int:
    """A benchmark's command: as root, measure() -> its report. Exits 0 when the
    report's proofs held, 1 when not or on an error, 2 without root."""
    if not is_root(command):
        return 2
    try:
        report = measure()
    except L4lbError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0 if report["ok"] else 1
