"""The health checks' costs and reaction times.

CPU: what the prober (l4lb/probe.py) spends for 1, 100, 1000 and 4096
targets probed every second: TCP connects (or HTTP GETs) from the prober in
one network namespace to a listener in another, across a veth pair, the
listener served by a child process. The figure is the CPU time of the
prober's thread (user + system: every probe, its loop and its callback run
there; Prober.cpu_times) over measured windows, as a share of one core, the median of the windows (the minimum beside it); the target is 25% at
4096. The listener's end of the veth has GRO and threaded NAPI, as a NIC's
receive side runs on its own (on the far host, for a backend): without them
veth would run the listener's half of every handshake inline in the prober's
connect(), as loopback does, and charge it to the prober. What stays charged
is the prober's own: its system calls and the sending of SYN, ACK and RST.

Failover: in the namespace testbed, `l4lb run` checks a VIP's three backends
(the backends' real servers, through the tunnel); one backend's server is
stopped, then started again. The time from the stop (SIGTERM sent) to the
WatchHealth event that reports it down, and from the restarted server's
first moment of listening to the event that reports it up. The event is sent
after the new Maglev table is in the kernel, so these times bound the time
to the table from above; each round checks the live table with LookupFlow.
Targets: fall × interval + timeout + 100 ms down, rise × interval (+ the same
100 ms for the commit) up.

    python -m bench.prober                  # 1, 100, 1000, 4096 targets, 10 s each; failover, 4 rounds
    python -m bench.prober --targets 4096 --seconds 20 --kind http --rounds 0
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import socket
import statistics
import threading
import time

import grpc

from l4lb.probe import Prober, Target
from l4lb.testbed.common import PREFIX
from l4lb.testbed.namespaces import Node, create_ns, next_tag, remove_ns, sweep

# the prober's and the listener's ends of the bench's own link (backends' range)
PROBER_ADDR, TARGET_ADDR = "198.18.2.200", "198.18.2.201"


class ProbeNet:
    """Two namespaces joined by a veth pair: `prober` for the Prober, `target`
    for the listener (module docstring). Removed on exit; a killed run's are
    removed by the next testbed's sweep (the names carry the owner's pid)."""

    def __init__(self):
        sweep()
        tag = next_tag()
        self.nodes: list[Node] = []
        try:
            for role in ("prober", "target"):
                ns = f"{PREFIX}-{tag}-{role}"
                create_ns(ns)
                self.nodes.append(Node(role, ns))
            self.prober, self.target = self.nodes
            fd = os.open(f"/run/netns/{self.target.ns}", os.O_RDONLY)
            try:
                self.prober.ipr.link("add", ifname="eth0", kind="veth",
                                     peer={"ifname": "eth0", "net_ns_fd": fd})
            finally:
                os.close(fd)
            for node, addr in ((self.prober, PROBER_ADDR), (self.target, TARGET_ADDR)):
                idx = node.index("eth0")
                node.ipr.addr("add", index=idx, address=addr, prefixlen=24)
                node.ipr.link("set", index=idx, state="up")
            self.target.gro("eth0")
            self.target.napi_threaded("eth0")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for node in self.nodes:
            node.close()
            remove_ns(node.ns)
        self.nodes = []

    def __enter__(self) -> "ProbeNet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


def measure(net: ProbeNet, n: int, seconds: float, kind: str, port: int, interval: float = 1.0,
            windows: int = 5) -> dict:
    """The CPU share over `windows` windows that together last `seconds`:
    the median is the figure (the machine is shared: one window may catch
    another process's burst), the minimum beside it. The prober's thread is
    started from the prober namespace's thread, so its sockets are made there."""
    with net.prober.run(Prober, lambda *a: None) as p:
        p.set_targets([Target(i, TARGET_ADDR, port, kind=kind, interval=interval, rise=1) for i in range(n)])
        time.sleep(interval)  # one round to settle: every target probed once
        before = {k: s.probes for k, s in p.results().items()}
        shares, users, systems, t_start = [], [], [], time.monotonic()
        for _ in range(windows):
            (c0, u0, s0), t0 = p.cpu_times(), time.monotonic()
            time.sleep(seconds / windows)
            (c1, u1, s1), wall = p.cpu_times(), time.monotonic() - t0
            shares.append((c1 - c0) / wall)
            users.append((u1 - u0) / wall)
            systems.append((s1 - s0) / wall)
        wall = time.monotonic() - t_start
        res = p.results()
    probes = sum(s.probes - before.get(k, 0) for k, s in res.items())
    failed = sum(1 for s in res.values() if s.ok is False)
    share = statistics.median(shares)
    return {"targets": n, "kind": kind, "interval_s": interval, "seconds": round(wall, 2), "windows": windows,
            "probes": probes, "probes_per_s": round(probes / wall, 1), "failed_last": failed,
            "cpu_share_of_one_core": round(share, 4), "cpu_share_min": round(min(shares), 4),
            "cpu_shares": [round(x, 4) for x in shares],
            "user_share": round(statistics.median(users), 4), "system_share": round(statistics.median(systems), 4),
            "cpu_us_per_probe": round(1e6 * share / max(probes / wall, 1e-9), 1)}


FAILOVER_CHECK = {"kind": "tcp", "interval": 1.0, "timeout": 0.5, "rise": 2, "fall": 3}
COMMIT_ALLOWANCE_S = 0.1


def _events(call, out: "queue.Queue") -> None:
    try:
        for e in call:
            out.put((time.monotonic(), e))
    except grpc.RpcError:
        pass
    out.put(None)


def _next_event(events: "queue.Queue", backend: str, state: str, timeout: float) -> tuple[float, object]:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            item = events.get(timeout=left)
        except queue.Empty:
            break
        if item is None:
            raise RuntimeError("the WatchHealth stream ended")
        at, e = item
        if e.backend == backend and e.new_state == state and not e.snapshot:
            return at, e
    raise RuntimeError(f"no event of {backend} going {state} within {timeout:.0f} s")


def failover(rounds: int = 4, check: dict | None = None, log=print) -> dict:
    """Stop-to-table and start-to-table times with real servers in the
    namespace testbed (module docstring)."""
    from control.client import Client  # noqa: PLC0415
    from control.launcher import launcher  # noqa: PLC0415
    from control.l4lb.v1 import l4lb_pb2 as pb  # noqa: PLC0415
    from l4lb.testbed import Testbed  # noqa: PLC0415

    check = dict(FAILOVER_CHECK, **(check or {}))
    down_target = check["fall"] * check["interval"] + check["timeout"] + COMMIT_ALLOWANCE_S
    up_target = check["rise"] * check["interval"] + COMMIT_ALLOWANCE_S
    log(f"  prober: failover, {rounds} rounds (testbed; check every {check['interval']:g} s, "
        f"timeout {check['timeout']:g} s, rise {check['rise']}, fall {check['fall']})")
    down, up, parts = [], [], []
    with Testbed(decap="auto", clients=1, backends=3, vips=1, progress=lambda m: None, launcher=launcher()) as bed, \
            Client(bed.lb.grpc_address) as c:
        vid = pb.VipId(address=bed.vip4(0), port=80, protocol="tcp")
        addrs = [b.addr4 for b in bed.backends]
        c.call("AddVip", pb.AddVipRequest(id=vid, backends=[pb.Backend(address=a, weight=1) for a in addrs]))
        c.call("SetHealthCheck", pb.SetHealthCheckRequest(id=vid, health=pb.HealthCheck(**check)))
        deadline = time.monotonic() + 10 * check["interval"] * check["rise"]
        # up, and probed: the first tunnel check loads the tc program first (seconds)
        while {(b.health, b.last_result) for b in c.call("GetVip", pb.GetVipRequest(id=vid)).backends} != \
                {("up", "connected")}:
            if time.monotonic() > deadline:
                raise RuntimeError("the backends did not come up")
            time.sleep(0.05)
        events: queue.Queue = queue.Queue()
        call = c.stub.WatchHealth(pb.WatchHealthRequest(id=vid))
        call.initial_metadata()
        threading.Thread(target=_events, args=(call, events), daemon=True).start()

        def table() -> set[str]:
            return {c.call("LookupFlow", pb.LookupFlowRequest(
                src=bed.clients[0].addr4, dst=vid.address, sport=20000 + i, dport=80, protocol="tcp")).backend
                for i in range(100)}

        limit = 10 * (check["fall"] * check["interval"] + check["timeout"])
        try:
            for r in range(rounds):
                b = bed.backends[r % len(bed.backends)]
                time.sleep(check["interval"] * (r + 0.5) / rounds)  # another phase of the probes each round
                t0, w0 = time.monotonic(), time.time()
                bed.stop_server(b)
                exited = time.monotonic() - t0
                at, e = _next_event(events, b.addr4, "down", limit)
                down.append(at - t0)
                parts.append({"server_exit_s": round(exited, 4), "probe_verdict_s": round(e.time - w0, 4),
                              "commit_and_event_s": round(at - t0 - (e.time - w0), 4), "reason": e.reason})
                if b.addr4 in table():
                    raise RuntimeError(f"{b.addr4} reported down but still in the table")
                bed.start_server(b)  # returns once it listens
                t1 = time.monotonic()
                at, _ = _next_event(events, b.addr4, "up", limit)
                up.append(at - t1)
                if table() != set(addrs):
                    raise RuntimeError(f"{b.addr4} reported up but not in the table")
                log(f"  prober: failover round {r + 1}/{rounds}: stop -> table without it {down[-1]:.3f} s "
                    f"(server gone after {parts[-1]['server_exit_s']:.3f} s, verdict at "
                    f"{parts[-1]['probe_verdict_s']:.3f} s: {parts[-1]['reason']}), "
                    f"listening -> table with it {up[-1]:.3f} s")
        finally:
            call.cancel()
    res = {"check": check, "rounds": rounds, "down_s": [round(x, 4) for x in down], "up_s": [round(x, 4) for x in up],
           "down_parts": parts,
           "down_target_s": down_target, "up_target_s": up_target}
    if down:
        res.update(down_max_s=round(max(down), 4), down_median_s=round(statistics.median(down), 4),
                   up_max_s=round(max(up), 4), up_median_s=round(statistics.median(up), 4))
        log(f"  prober: failover: down max {res['down_max_s']:.3f} s (target {down_target:.2f} s), "
            f"up max {res['up_max_s']:.3f} s (target {up_target:.2f} s)")
    return res


def run(targets=(1, 100, 1000, 4096), seconds: float = 10.0, kind: str = "tcp", rounds: int = 4,
        log=print) -> dict:
    """Every size in turn against one listener, then the failover rounds
    (none with rounds=0); the part `make bench` runs."""
    rows = []
    with ProbeNet() as net:
        lsock = net.target.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((TARGET_ADDR, 0))
        lsock.listen(4096)
        server = multiprocessing.Process(target=_serve, args=(lsock, kind), daemon=True)
        server.start()
        try:
            for n in targets:
                row = measure(net, n, seconds, kind, lsock.getsockname()[1])
                rows.append(row)
                log(f"  prober: {row['targets']:5d} targets ({row['kind']}, every {row['interval_s']:g} s): "
                    f"{row['probes_per_s']:7.1f} probes/s, CPU {100 * row['cpu_share_of_one_core']:5.1f}% "
                    f"of one core, median of {row['windows']} (min {100 * row['cpu_share_min']:.1f}%; "
                    f"user {100 * row['user_share']:.1f}%, system {100 * row['system_share']:.1f}%), "
                    f"{row['cpu_us_per_probe']:.0f} us/probe, failed {row['failed_last']}")
        finally:
            server.terminate()
            server.join()
            lsock.close()
    out = {"benchmark": "prober", "rows": rows}
    if rounds:
        out["failover"] = failover(rounds, log=log)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=int, nargs="+", default=[1, 100, 1000, 4096])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--kind", choices=["tcp", "http"], default="tcp")
    ap.add_argument("--rounds", type=int, default=4, help="failover rounds in the testbed (0: none)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    res = run(args.targets, args.seconds, args.kind, args.rounds, log=lambda line: print(line, flush=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    worst = next((r for r in res["rows"] if r["targets"] == 4096), None)
    fo = res.get("failover", {})
    missed = (worst and worst["cpu_share_of_one_core"] > 0.25) or \
        (fo.get("down_s") and (fo["down_max_s"] > fo["down_target_s"] or fo["up_max_s"] > fo["up_target_s"]))
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
