"""Control-plane speed: Maglev table builds, pushing a ring into the kernel,
gRPC AddBackends / SetBackendWeights latency against a real server, each
beside a baseline measured in the same run, and the time from such an RPC's
return to the first packet that follows the new table.

    .venv/bin/python -m bench.controlplane [--quick] [--out PATH]

RPC to packet: the server runs in this process on the loaded (not attached)
program. For each change a flow is chosen whose Maglev pick must change with
it (AddBackends: a flow the new backend takes; SetBackendWeights to 0: a flow
of the drained backend), and a SYN of that flow (a SYN always takes a fresh
pick) is run once before the RPC to prove the old pick. As soon as the RPC
returns, the same packet runs (BPF_PROG_TEST_RUN) in a tight loop until its
outer destination is the new pick. The ring is written, and the VIP flipped
to it, before the RPC returns, so the first run should already take the new
backend: the report gives the time from the return to the end of that first
run, how many runs were needed, and the time of one run for comparison.
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from control.client import Client
from control.l4lb.v1 import l4lb_pb2 as pb
from control.server import create_server
from control.servicer import LoadBalancerServicer
from l4lb import bpf, consts, flowhash, maglev, libbpf
from l4lb.controller import Controller
from l4lb.model import VipKey
from l4lb.dataplane import Dataplane, RuntimeConfig

from . import common, ctmap
from .balancer import Loaded
from .common import (CLIENT4, CLIENT_MAC, GW_MAC, LB_MAC, RESULTS_DIR, VIP4, minmed, pool,
                     write_json)
from .harness import BENCH_DIR


def _backends(n: int, start: int = 0) -> dict[str, int]:
    """n backends of weight 1 from the benchmarks' pool (common.pool)."""
    return {a: 1 for a in pool(n, start)}


def _best(fn, rounds: int) -> dict[str, float]:
    """fn() timed `rounds` times, in seconds: min and median."""
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return minmed(times)


def maglev_builds(sizes, rounds, ring_sizes=(65537,)):
    out = []
    for m in ring_sizes:
        for n in sizes:
            b = _backends(n)
            keys = [ipaddress.ip_address(a).packed for a in b]
            w = [1] * n
            fast = _best(lambda: maglev.maglev_indices(keys, w, m), rounds)
            slow = _best(lambda: maglev.maglev_indices(keys, w, m, force_python=True), max(1, rounds // 3))
            # the table as addresses (what the targets name): validation and names included
            table = _best(lambda: maglev.maglev_table(b, m), rounds)
            out.append({"ring_size": m, "backends": n, "min_ms": fast["min"] * 1e3,
                        "median_ms": fast["median"] * 1e3,
                        "table_min_ms": table["min"] * 1e3, "table_median_ms": table["median"] * 1e3,
                        "python_loop_min_ms": slow["min"] * 1e3, "speedup": slow["min"] / fast["min"]})
            print(f"  maglev M={m} N={n}: {fast['min']*1e3:.2f} ms, addresses out "
                  f"{table['min']*1e3:.2f} / {table['median']*1e3:.2f} ms (min / median) "
                  f"(pure Python {slow['min']*1e3:.1f} ms)", flush=True)
    return out


def ring_push(prog, cap, rounds):
    t = prog.table(consts.MAP_RINGS)
    arr = np.arange(cap.ring_size, dtype=np.uint32) % 7
    whole = _best(lambda: t.__setitem__(t.Key(0), t.Leaf.from_buffer_copy(arr.tobytes())), rounds)
    # per-entry baseline: the same bytes through one syscall per slot of a plain array map
    b, _ = bpf.compile_program("ringmap.c", [f"-DSLOTS={cap.ring_size}"], [], src_dir=BENCH_DIR)
    s = b[b"slots"]
    n = 4096
    keys = (s.Key * n)(*range(n))
    vals = (s.Leaf * n)(*arr[:n].tolist())
    key_objs = [s.Key(i) for i in range(n)]
    val_objs = [s.Leaf(int(v)) for v in arr[:n]]

    def per_entry():
        for k, v in zip(key_objs, val_objs):
            s[k] = v
    per = _best(per_entry, max(1, rounds // 3))
    batch = _best(lambda: s.items_update_batch(keys, vals), max(1, rounds // 3))
    scale = cap.ring_size / n
    b.cleanup()
    res = {"whole_ring_min_ms": whole["min"] * 1e3, "whole_ring_median_ms": whole["median"] * 1e3,
           "per_entry_full_ring_ms": per["min"] * 1e3 * scale,
           "batched_full_ring_ms": batch["min"] * 1e3 * scale}
    print(f"  ring push (M={cap.ring_size}): whole value {whole['min']*1e3:.3f} ms; per entry "
          f"{res['per_entry_full_ring_ms']:.1f} ms; batched {res['batched_full_ring_ms']:.1f} ms", flush=True)
    return res


@contextlib.contextmanager
def _serving(ctrl, vip: str, backends: dict[str, int]):
    """The gRPC server on ctrl, at a unix socket of its own, with the gateway set and
    `vip` (TCP :80) added with these backends: yields (its address, the VIP's id)."""
    address = f"unix:{Path(tempfile.mkdtemp(prefix='l4lb-bench-')) / 's.sock'}"
    server, _ = create_server(LoadBalancerServicer(ctrl), address)
    try:
        vid = pb.VipId(address=vip, port=80, protocol="tcp")
        with Client(address) as c:
            c.call("SetGateway", pb.SetGatewayRequest(mac=GW_MAC))
            c.call("AddVip", pb.AddVipRequest(
                id=vid, backends=[pb.Backend(address=a, weight=w) for a, w in backends.items()]))
        yield address, vid
    finally:
        server.stop(0)


def _writers(address: str, vip: str, kind: str, clients: int, requests: int, existing: list[str], out) -> None:
    """`clients` threads in a process of their own (as separate clients would
    be), each a gRPC client making its share of `requests`; puts (latencies,
    wall seconds) on `out`."""
    vid = pb.VipId(address=vip, port=80, protocol="tcp")
    lat: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def worker(k):
        with Client(address) as c:
            c.call("GetGateway", pb.GetGatewayRequest())  # connected before the clock starts
            start.wait()
            for i in range(requests // clients):
                t = time.perf_counter()
                if kind == "AddBackends":
                    # from the pool, past the VIP's 100: 100 addresses per client
                    addr = pool(1, 1000 + 100 * k + i % 100)[0]
                    c.call("AddBackends", pb.AddBackendsRequest(id=vid, backends=[pb.Backend(address=addr, weight=1)]))
                    dt = time.perf_counter() - t
                    c.call("RemoveBackends", pb.RemoveBackendsRequest(id=vid, addresses=[addr]))
                else:
                    c.call("SetBackendWeights", pb.SetBackendWeightsRequest(
                        id=vid, backends=[pb.Backend(address=existing[(k + i) % 100], weight=1 + i % 3)]))
                    dt = time.perf_counter() - t
                with lock:
                    lat.append(dt)

    ths = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in ths:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in ths:
        t.join()
    out.put((lat, time.perf_counter() - t0))


COMMIT_VIP = "198.18.10.30"


def commit_rate(ctrl, requests: int, clients: int) -> dict:
    """Small updates per second through the Controller alone (no gRPC): each
    of `clients` threads sets weights on a VIP of 100 backends; concurrent
    requests are committed together (mean batch reported)."""
    key = VipKey(COMMIT_VIP, 80, "tcp")  # beside the VIP that rpc_latency leaves
    addrs = list(_backends(100))
    ctrl.add_vip(key, [], [(a, 1) for a in addrs])
    sizes: list[int] = []
    run = ctrl._run  # noqa: SLF001 -- counted here only, the batches are the subject

    def counted(batch):
        sizes.append(len(batch))
        run(batch)

    ctrl._run = counted  # noqa: SLF001

    def worker(k):
        for i in range(requests // clients):
            ctrl.set_weights(key, [(addrs[(k + i) % 100], 1 + i % 3)])

    ths = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    wall = time.perf_counter() - t0
    ctrl._run = run  # noqa: SLF001
    ctrl.delete_vip(key)
    res = {"clients": clients, "per_second": (requests // clients) * clients / wall,
           "mean_batch": sum(sizes) / max(len(sizes), 1)}
    print(f"  commits without gRPC ({clients} writer(s)): {res['per_second']:.0f}/s, "
          f"mean batch {res['mean_batch']:.1f}", flush=True)
    return res


def rpc_latency(ctrl, requests: int, clients: int):
    """Latency and rate of small updates from `clients` concurrent clients,
    which run in another process (Python's lock would otherwise make the
    clients and the server take turns)."""
    import multiprocessing  # noqa: PLC0415

    mp = multiprocessing.get_context("spawn")
    with _serving(ctrl, VIP4, _backends(100)) as (address, vid):
        with Client(address) as c:
            base = _best(lambda: c.call("GetGateway", pb.GetGatewayRequest()), 200)
        results = {}
        existing = list(_backends(100))
        for kind in ("AddBackends", "SetBackendWeights"):
            q = mp.Queue()
            proc = mp.Process(target=_writers, args=(address, vid.address, kind, clients, requests, existing, q))
            cpu0 = time.process_time()
            proc.start()
            lat, wall = q.get(timeout=600)
            proc.join()
            server_cpu = time.process_time() - cpu0  # every thread of this (the server's) process
            lat.sort()
            results[kind] = {"clients": clients, "p50_ms": lat[len(lat) // 2] * 1e3,
                             "p99_ms": lat[int(len(lat) * 0.99) - 1] * 1e3, "per_second": len(lat) / wall,
                             "server_cpu_ms_per_request": server_cpu * 1e3 / len(lat)}
            print(f"  {kind} ({clients} client(s), VIP with 100 backends): p50 {results[kind]['p50_ms']:.2f} ms, "
                  f"p99 {results[kind]['p99_ms']:.2f} ms, {results[kind]['per_second']:.0f}/s, server CPU "
                  f"{results[kind]['server_cpu_ms_per_request']:.2f} ms/request", flush=True)
        results["empty_rpc_ms"] = base["min"] * 1e3
        return results


RTP_VIP = "198.18.10.20"
RTP_CLIENT = CLIENT4
RTP_TIMEOUT_NS = 1_000_000_000


def _syn(sport: int) -> bytes:
    from scapy.layers.inet import IP, TCP  # noqa: PLC0415
    from scapy.layers.l2 import Ether  # noqa: PLC0415

    return bytes(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=RTP_CLIENT, dst=RTP_VIP) /
                 TCP(sport=sport, dport=80, flags="S", seq=1))


def _outer_dst(r: libbpf.RunResult) -> str | None:
    """The backend of a 4in4 frame the program sent (None for anything else)."""
    if r.verdict != libbpf.XDP_TX or r.data[12:14] != b"\x08\x00" or r.data[23] != 4:
        return None
    return str(ipaddress.IPv4Address(r.data[30:34]))


def _moving_flow(old: list, new: list, m: int, want) -> tuple[int, str, str]:
    """A source port whose pick changes from old to new table, with want(old, new) true."""
    for sport in range(1024, 65536):
        slot = flowhash.ring_slot(flowhash.flow_hash(RTP_CLIENT, RTP_VIP, sport, 80, 6), m)
        if old[slot] != new[slot] and want(old[slot], new[slot]):
            return sport, old[slot], new[slot]
    raise RuntimeError("no flow changes its pick with this change")


def rpc_to_packet(prog, cap, changes: int, log=print) -> dict:
    """Time from the return of AddBackends / SetBackendWeights to the first packet
    (BPF_PROG_TEST_RUN on `prog`) that goes to the new pick. See the module's notes."""
    ctrl = Controller(_emptied(prog, cap), RuntimeConfig())
    m = cap.ring_size
    out: dict = {"vip": f"{RTP_VIP}:80/tcp", "backends": 100, "ring_size": m, "changes": changes}
    failures: list[str] = []
    base = _backends(100)
    with _serving(ctrl, RTP_VIP, base) as (address, vid):
        with Client(address) as c:
            old_table = maglev.maglev_table(base, m)
            one_run = []
            for kind in ("AddBackends", "SetBackendWeights"):
                first_us, new_us, runs = [], [], []
                for i in range(changes):
                    if kind == "AddBackends":
                        # a backend the VIP does not have: the pool after its 100
                        addr = pool(1, 100 + i % 200)[0]
                        new = {**base, addr: 1}
                        req = pb.AddBackendsRequest(id=vid, backends=[pb.Backend(address=addr, weight=1)])
                        undo = ("RemoveBackends", pb.RemoveBackendsRequest(id=vid, addresses=[addr]))
                        want = lambda o, n, a=addr: n == a  # noqa: E731
                    else:
                        addr = list(base)[i % len(base)]
                        new = {**base, addr: 0}
                        req = pb.SetBackendWeightsRequest(id=vid, backends=[pb.Backend(address=addr, weight=0)])
                        undo = ("SetBackendWeights", pb.SetBackendWeightsRequest(
                            id=vid, backends=[pb.Backend(address=addr, weight=1)]))
                        want = lambda o, n, a=addr: o == a  # noqa: E731
                    new_table = maglev.maglev_table(new, m)
                    sport, before, after = _moving_flow(old_table, new_table, m, want)
                    frame = _syn(sport)
                    t0 = time.perf_counter_ns()
                    r = libbpf.run(prog.fd, frame)
                    one_run.append(time.perf_counter_ns() - t0)
                    if _outer_dst(r) != before:
                        failures.append(f"{kind} #{i}: before the RPC the flow went to "
                                        f"{_outer_dst(r)}, the old table says {before}")
                    c.call(kind, req)
                    returned = time.perf_counter_ns()
                    n_runs, first = 0, None
                    while True:
                        r = libbpf.run(prog.fd, frame)
                        now = time.perf_counter_ns()
                        n_runs += 1
                        if first is None:
                            first = now - returned
                        if _outer_dst(r) == after:
                            break
                        if now - returned > RTP_TIMEOUT_NS:
                            failures.append(f"{kind} #{i}: no packet went to {after} within 1 s")
                            break
                    first_us.append(first / 1e3)
                    new_us.append((now - returned) / 1e3)
                    runs.append(n_runs)
                    c.call(*undo)
                first_us.sort()
                out[kind] = {
                    "first_run_us": {"p50": statistics.median(first_us), "max": first_us[-1],
                                     "min": first_us[0]},
                    "to_new_pick_us": {"p50": statistics.median(new_us), "max": max(new_us)},
                    "runs_needed": {"max": max(runs), "all_first": all(n == 1 for n in runs),
                                    "histogram": {str(k): runs.count(k) for k in sorted(set(runs))}},
                }
                log(f"  {kind} -> first packet on the new table: {out[kind]['first_run_us']['p50']:.1f} us "
                    f"after the return (p50; max {out[kind]['first_run_us']['max']:.1f} us), "
                    f"runs needed: max {max(runs)} of {changes} changes")
            out["one_run_us"] = {"p50": statistics.median(one_run) / 1e3, "min": min(one_run) / 1e3}
    out["failures"] = failures
    out["ok"] = not failures
    return out


def machine() -> dict:
    """This report's short form of common.machine()."""
    m = common.machine()
    return {"cpu": m["cpu_model"], "cores": m["cores"], "kernel": m["kernel"],
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


QUICK = {"rounds": 3, "sizes": (10, 100, 1000), "ring_sizes": (65537,), "requests": 100,
         "clients": (1, 50), "changes": 20}
FULL = {"rounds": 9, "sizes": (10, 100, 1000, 4096), "ring_sizes": (65537, 655373),
        "requests": 1000, "clients": (1, 8, 50), "changes": 100}
SMOKE = {"rounds": 1, "sizes": (10, 100), "ring_sizes": (65537,), "requests": 8,
         "clients": (1,), "changes": 3}
SETTINGS = {"FULL": FULL, "QUICK": QUICK, "SMOKE": SMOKE}


def _emptied(prog, cap) -> Dataplane:
    """A Dataplane on prog with every map back to empty (a program may come used)."""
    dp = Dataplane(prog, cap)
    for family in (consts.FAMILY_V4, consts.FAMILY_V6):
        # the table as the build reads it (an array of buckets takes no map deletes)
        ctmap.drain(dp.conntrack_table(family))
    dp.clear()
    return dp


def run(settings: dict | str = FULL, log=print, loaded: Loaded | None = None) -> dict:
    """Every measurement with these settings (FULL, QUICK or SMOKE, or their name); returns
    the results. loaded: programs shared with other parts; its balancer, if it has one, is
    used (its maps are emptied; it stays open); otherwise one of capacity 4 VIPs, 1024
    backends, a 4096-entry connection table is loaded."""
    if isinstance(settings, str):
        settings = SETTINGS[settings]
    rounds = settings["rounds"]
    res = {"benchmark": "controlplane", "machine": machine(),
           "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}}
    started = time.time()
    res["maglev"] = maglev_builds(settings["sizes"], rounds, settings["ring_sizes"])
    lb = loaded.balancer if loaded is not None else None
    own = lb is None
    if own:
        cap = consts.Capacity(max_vips=4, max_backends=1024, ct_size=4096)
        prog = bpf.load_balancer(cap)
    else:
        prog, cap = lb.prog, lb.capacity
    res["capacity"] = {"max_vips": cap.max_vips, "max_backends": cap.max_backends,
                       "ct_size": cap.ct_size, "ring_size": cap.ring_size}
    try:
        res["ring_push"] = ring_push(prog, cap, rounds * 3)
        res["rpc"] = {}
        for clients in settings["clients"]:
            # every change is persisted (fsync'd) as in `l4lb run`
            state_file = Path(tempfile.mkdtemp(prefix="l4lb-bench-")) / "state.json"
            ctrl = Controller(_emptied(prog, cap), RuntimeConfig(), state_file=state_file)
            res["rpc"][str(clients)] = rpc_latency(ctrl, max(settings["requests"], 2 * clients), clients)
            res.setdefault("commits", {})[str(clients)] = commit_rate(ctrl, max(settings["requests"], 2 * clients), clients)
        res["rpc_to_packet"] = rpc_to_packet(prog, cap, settings["changes"], log)
    finally:
        if own:
            prog.close()
    res["duration_s"] = round(time.time() - started, 1)
    res["ok"] = res["rpc_to_packet"]["ok"]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS_DIR / "controlplane.json"))
    args = ap.parse_args(argv)
    print("control plane:", flush=True)
    res = run(QUICK if args.quick else FULL)
    write_json(args.out, res, indent=1)
    print(f"wrote {args.out}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
