"""CPU the health prober (l4lb/probe.py) spends, for 1, 100, 1000 and 4096
targets probed every second (TCP connects to a listener on 127.0.0.1, served
by a child process so that its work is not counted). The figure is the
prober process's CPU time (user + system, all threads) over a measured
window, as a share of one core; the target is 25% at 4096. On loopback the
system share includes the listener's side of every handshake (the kernel
runs it in the connecting process's softirq): a plain loop making the same
system calls 4000 times a second costs ~3% user and ~20% system here.

    python -m bench.prober                  # 1, 100, 1000, 4096 targets, 10 s each
    python -m bench.prober --targets 4096 --seconds 20 --kind http
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import socket
import time

from l4lb.probe import Prober, Target

LOCAL = "127.0.0.1"


def _serve(sock: socket.socket, kind: str) -> None:
    """Accepts and answers until killed (in the child process)."""
    answer = b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"
    while True:
        conn, _ = sock.accept()
        try:
            if kind == "http":
                conn.recv(4096)
                conn.sendall(answer)
        except OSError:
            pass
        finally:
            conn.close()


def cpu_seconds() -> tuple[float, float]:
    """(user, system) CPU seconds of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def measure(n: int, seconds: float, kind: str, port: int, interval: float = 1.0) -> dict:
    done = {"up": 0}

    def on_transition(key, up, reason, latency):
        done["up"] += up

    with Prober(on_transition) as p:
        p.set_targets([Target(i, LOCAL, port, kind=kind, interval=interval, rise=1) for i in range(n)])
        time.sleep(interval)  # one round to settle: every target probed once
        before = {k: s.probes for k, s in p.results().items()}
        cpu0, t0 = cpu_seconds(), time.monotonic()
        time.sleep(seconds)
        (u1, s1), wall = cpu_seconds(), time.monotonic() - t0
        user, system = u1 - cpu0[0], s1 - cpu0[1]
        cpu = user + system
        res = p.results()
    probes = sum(s.probes - before.get(k, 0) for k, s in res.items())
    failed = sum(1 for s in res.values() if s.ok is False)
    return {"targets": n, "kind": kind, "interval_s": interval, "seconds": round(wall, 2),
            "probes": probes, "probes_per_s": round(probes / wall, 1), "failed_last": failed,
            "cpu_share_of_one_core": round(cpu / wall, 4), "user_share": round(user / wall, 4),
            "system_share": round(system / wall, 4), "cpu_us_per_probe": round(1e6 * cpu / max(probes, 1), 1)}


def run(targets=(1, 100, 1000, 4096), seconds: float = 10.0, kind: str = "tcp", log=print) -> dict:
    """Every size in turn against one listener; the part `make bench` runs."""
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((LOCAL, 0))
    lsock.listen(4096)
    server = multiprocessing.Process(target=_serve, args=(lsock, kind), daemon=True)
    server.start()
    rows = []
    try:
        for n in targets:
            row = measure(n, seconds, kind, lsock.getsockname()[1])
            rows.append(row)
            log(f"  prober: {row['targets']:5d} targets ({row['kind']}, every {row['interval_s']:g} s): "
                f"{row['probes_per_s']:7.1f} probes/s, CPU {100 * row['cpu_share_of_one_core']:5.1f}% "
                f"of one core (user {100 * row['user_share']:.1f}%, system {100 * row['system_share']:.1f}%), "
                f"{row['cpu_us_per_probe']:.0f} us/probe, failed {row['failed_last']}")
    finally:
        server.terminate()
        server.join()
        lsock.close()
    return {"benchmark": "prober", "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=int, nargs="+", default=[1, 100, 1000, 4096])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--kind", choices=["tcp", "http"], default="tcp")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    rows = run(args.targets, args.seconds, args.kind, log=lambda line: print(line, flush=True))["rows"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    worst = next((r for r in rows if r["targets"] == 4096), None)
    return 1 if worst and worst["cpu_share_of_one_core"] > 0.25 else 0


if __name__ == "__main__":
    raise SystemExit(main())
