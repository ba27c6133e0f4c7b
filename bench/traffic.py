"""Traffic rate through the LB in the namespace testbed, beside a plain
XDP_TX reflector on the same veth, with the same generator, in the same run.

The generator is a BPF program run with BPF_PROG_TEST_RUN in live-frames mode
(BPF_F_TEST_XDP_LIVE_FRAMES) on the router's end of the LB link: every run's
frame really leaves that veth and arrives at the LB's, where the balancer
(or the reflector) sends it back with XDP_TX.

Three measurements:
- LB against reflector: a sink program on the router's end counts and drops
  what comes back, so the rate is the LB's (or the reflector's), per second of
  generation. On veth the receiver's NAPI runs on the generating CPU, so the
  rate is that of the whole chain (generator, LB, sink) on one CPU; the ratio
  compares the LB with the reflector in the same chain.
- New connections against reflector: the same with a generator that makes every
  frame a TCP SYN of a flow never seen before (bench/gen.c with NEW_FLOWS), so
  the LB takes a Maglev pick and writes an entry for every frame (a SYN's goes
  into the SYN table until the flow's next packet):
  connections per second, as a ratio to the reflector's rate on the same frames.
  The LB runs with new_flow_rate 0 (no limit), or the limit would serve most of
  them by Maglev alone; the LB's ct_insert counter must move by exactly the
  frames that came back.
- End to end: with the router forwarding the tunnelled packets, the rate at
  which the backends receive them (decapsulated by their XDP program).
The kernel's pktgen would do the generating where the module exists; this
generator needs no module.

    .venv/bin/python -m bench.traffic [--quick] [--count N] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from control.client import Client
from control.launcher import launcher
from control.l4lb.v1 import l4lb_pb2 as pb
from l4lb import netlink, libbpf
from l4lb.bpf import percpu_sum
from l4lb.testbed import Testbed
from l4lb.testbed.namespaces import stop_popen

from .common import RESULTS_DIR, write_json
from .harness import load_program

FLOWS = 4096
FRAME_LEN = 64



def _attach(node, ifname: str, fd: int, replace_id: int | None = None) -> None:
    """Attaches (or swaps in) an XDP program natively inside node's namespace."""
    node.run(lambda: libbpf.xdp_attach(netlink.ifindex(ifname), fd, "native", replace_id))

def _frame(src_mac: str, dst_mac: str, vip: str, flags: str = "A") -> bytes:
    pkt = Ether(src=src_mac, dst=dst_mac) / IP(src="198.18.0.1", dst=vip, ttl=64) / \
        TCP(sport=10000, dport=80, flags=flags, seq=1, ack=1 if "A" in flags else 0)
    raw = bytes(pkt)
    return raw + bytes(max(0, FRAME_LEN - len(raw)))


def _returned(tb, sink) -> int:
    if sink is None:
        return percpu_sum(tb.router_program.table("decap_stats"))["pass"]
    return sum(sink.table("sink_count")[sink.table("sink_count").Key(0)])


def _ct_inserts(tb) -> int:
    with Client(tb.lb.grpc_address) as c:
        return c.call("GetStats", pb.GetStatsRequest()).counters["ct_insert"]


def _backends_received(tb) -> int:
    return sum(sum(b.decap_totals().values()) for b in tb.backends)


def _measure(tb, gen, frame: bytes, count: int, sink=None) -> dict:
    ifindex = tb.router.run(tb.router.index, "lb")
    r0, b0 = _returned(tb, sink), _backends_received(tb)
    t0 = time.perf_counter()
    tb.router.run(libbpf.run_live, gen.fd, frame, count, ifindex)
    gen_s = time.perf_counter() - t0
    time.sleep(0.3)  # the last frames drain through the veth queues
    returned = _returned(tb, sink) - r0
    backends = _backends_received(tb) - b0
    return {"sent": count, "seconds": gen_s, "returned": returned, "returned_pps": returned / gen_s,
            "backends_received": backends, "backends_pps": backends / gen_s,
            "generated_pps": count / gen_s}


IPERF_PORT = 5201


def _iperf(client, dst: str, seconds: int, streams: int) -> dict:
    for _ in range(10):
        r = subprocess.run(client.nsenter() + ["iperf3", "-c", dst, "-p", str(IPERF_PORT), "-t", str(seconds),
                                               "-P", str(streams), "--json", "--connect-timeout", "3000"],
                           capture_output=True, text=True, timeout=seconds + 60)
        doc = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {"error": r.stderr.strip()[-200:]}
        if "busy" not in doc.get("error", ""):
            break
        time.sleep(1)  # the server has not yet closed the previous test
    if "error" in doc:
        raise RuntimeError(f"iperf3 -c {dst} -P {streams}: {doc['error']}")
    end = doc["end"]
    return {"gbps": end["sum_received"]["bits_per_second"] / 1e9,
            "retransmits": end["sum_sent"].get("retransmits", 0)}


def iperf_ratio(tb, seconds: int = 5, rounds: int = 3, say=print) -> dict:
    """iperf3 (Debian's) TCP from a client to one backend through a one-backend
    VIP and straight to the backend's own address, one stream and four,
    interleaved round by round; per case the median ratio LB/direct and the
    retransmits of each path."""
    b, client = tb.backends[0], tb.clients[0]
    vip = tb.vip4(0)
    with Client(tb.lb.grpc_address) as c:
        c.call("AddVip", pb.AddVipRequest(id=pb.VipId(address=vip, port=IPERF_PORT, protocol="tcp"),
                                          backends=[pb.Backend(address=b.addr4, weight=1)]))
    server = subprocess.Popen(b.nsenter() + ["iperf3", "-s", "-p", str(IPERF_PORT)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = {"seconds": seconds, "rounds": rounds}
    try:
        time.sleep(0.5)
        drop0 = tb.router.run(tb.router.link_stats, "lb")["tx_dropped"]
        qdrop0 = tb.router.qdisc_stats("lb")["drops"]
        for streams in (1, 4):
            runs = {"direct": [], "lb": []}
            for _ in range(rounds):
                for path, dst in (("direct", b.addr4), ("lb", vip)):
                    runs[path].append(_iperf(client, dst, seconds, streams))
            ratios = [lb["gbps"] / d["gbps"] for lb, d in zip(runs["lb"], runs["direct"])]
            case = {"ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                    "direct_gbps": statistics.median(r["gbps"] for r in runs["direct"]),
                    "lb_gbps": statistics.median(r["gbps"] for r in runs["lb"]),
                    "direct_retransmits": [r["retransmits"] for r in runs["direct"]],
                    "lb_retransmits": [r["retransmits"] for r in runs["lb"]]}
            out[f"P{streams}"] = case
            say(f"  iperf3 TCP -P {streams}: through the LB {case['lb_gbps']:.2f} Gb/s, direct "
                f"{case['direct_gbps']:.2f} Gb/s, ratio {case['ratio_median']:.2f} "
                f"({case['ratio_min']:.2f}-{case['ratio_max']:.2f}); retransmits LB {case['lb_retransmits']}, "
                f"direct {case['direct_retransmits']}")
        out["router_to_lb_tx_dropped"] = tb.router.run(tb.router.link_stats, "lb")["tx_dropped"] - drop0
        out["router_to_lb_queue_drops"] = tb.router.qdisc_stats("lb")["drops"] - qdrop0
    finally:
        stop_popen(server)
    return out


def run(quick: bool = False, count: int | None = None, say=print, iperf: tuple[int, int] | None = None) -> dict:
    """iperf: (seconds, rounds) of the iperf3 part; by default 5 s x 3 (2 s x 2 quick)."""
    count = count or (200_000 if quick else 2_000_000)
    out = {"count": count, "flows": FLOWS, "frame_bytes": FRAME_LEN}
    with Testbed(decap="xdp", clients=1, backends=3, vips=1, progress=lambda m: None,
                 launcher=launcher()) as tb:
        vip = tb.vip4(0)
        backends = ", ".join(f"{{address: {b.addr4}}}" for b in tb.backends)
        with Client(tb.lb.grpc_address) as c:
            # the testbed's own settings, no new-flow limit, and the VIP
            c.call("Apply", pb.ApplyRequest(config_yaml=tb.lb.config.read_text() + (
                "new_flow_rate: 0\n"
                f"vips: [{{address: {vip}, port: 80, protocol: tcp, backends: [{backends}]}}]\n")))
        lb_mac = tb.lb.run(lambda: tb.lb.ipr.link("get", index=tb.lb.index(tb.lb.ifname))[0].get_attr("IFLA_ADDRESS"))
        frame = _frame(tb.gateway_mac, lb_mac, vip)
        syn = _frame(tb.gateway_mac, lb_mac, vip, "S")
        gen = load_program("gen.c", "gen", [f"-DFLOWS={FLOWS}"])
        t = gen.table("gen_frame")
        t[t.Key(0)] = t.Leaf.from_buffer_copy(frame[:FRAME_LEN])
        gen_syn = load_program("gen.c", "gen", ["-DNEW_FLOWS"])
        t = gen_syn.table("gen_frame")
        t[t.Key(0)] = t.Leaf.from_buffer_copy(syn[:FRAME_LEN])
        refl = load_program("reflector.c", "reflect")
        sink = load_program("sink.c", "sink")
        router_id = tb.router.run(netlink.xdp_program, "lb")[0]
        try:
            # the generator outruns a NAPI thread: the LB's work inline, on the generating CPU
            tb.lb_napi_threaded(False)
            _measure(tb, gen, frame, min(count, 20_000))  # warm: the flows' entries exist
            e2e = min(count, 100_000)  # the router's stack forwards these: slow, and enough
            say(f"  traffic: end to end, {e2e} frames over {FLOWS} flows to the backends ...")
            out["end_to_end"] = _measure(tb, gen, frame, e2e)
            _attach(tb.router, "lb", sink.fd, router_id)
            try:
                say(f"  traffic: balancer, {count} frames ...")
                out["balancer"] = _measure(tb, gen, frame, count, sink)
                say(f"  traffic: balancer, {count} new connections (SYNs) ...")
                inserts = _ct_inserts(tb)
                conn = {"balancer": _measure(tb, gen_syn, syn, count, sink)}
                conn["balancer"]["ct_insert"] = _ct_inserts(tb) - inserts
                prog_id = tb.lb.detach()
                _attach(tb.lb, tb.lb.ifname, refl.fd)
                try:
                    say(f"  traffic: XDP_TX reflector, {count} frames ...")
                    out["reflector"] = _measure(tb, gen, frame, count, sink)
                    say(f"  traffic: XDP_TX reflector, {count} SYNs of new flows ...")
                    conn["reflector"] = _measure(tb, gen_syn, syn, count, sink)
                finally:
                    tb.lb.run(lambda: libbpf.xdp_detach(netlink.ifindex(tb.lb.ifname), "native"))
                    tb.lb.attach(prog_id)
            finally:
                sink_id = tb.router.run(netlink.xdp_program, "lb")[0]
                _attach(tb.router, "lb", tb.router_program.fd, sink_id)
        finally:
            for p in (gen, gen_syn, refl, sink):
                p.close()
        say("  traffic: iperf3 through the LB and straight to a backend ...")
        tb.lb_napi_threaded(True)
        seconds, rounds = iperf or ((2, 2) if quick else (5, 3))
        out["iperf3"] = iperf_ratio(tb, seconds, rounds, say)
    out["ratio"] = out["balancer"]["returned_pps"] / out["reflector"]["returned_pps"]
    conn["ratio"] = conn["balancer"]["returned_pps"] / conn["reflector"]["returned_pps"]
    out["connections"] = conn
    say(f"  traffic: balancer {out['balancer']['returned_pps'] / 1e6:.2f} Mpps, reflector "
        f"{out['reflector']['returned_pps'] / 1e6:.2f} Mpps, ratio {out['ratio']:.2f} "
        f"; end to end the backends received {out['end_to_end']['backends_pps'] / 1e6:.2f} Mpps")
    say(f"  traffic: new connections: balancer {conn['balancer']['returned_pps'] / 1e6:.2f} M/s, "
        f"reflector {conn['reflector']['returned_pps'] / 1e6:.2f} Mpps, ratio {conn['ratio']:.2f} "
        f"({conn['balancer']['ct_insert']} entries written for {conn['balancer']['returned']} SYNs)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--count", type=int)
    ap.add_argument("--out", default=str(RESULTS_DIR / "traffic.json"))
    args = ap.parse_args(argv)
    res = run(args.quick, args.count)
    write_json(args.out, res, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
