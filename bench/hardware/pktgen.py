"""Many flows to a VIP through a real NIC with the kernel's packet generator
(pktgen, /proc/net/pktgen). Run it on a sender host cabled (or switched) to the
LB's NIC; see bench/hardware/README.md.

    python3 -m bench.hardware.pktgen --dev eth1 --dst-mac 02:00:00:00:01:01 \\
        [--vip 198.18.10.10] [--port 53] [--src 198.18.0.0/24] [--flows 65536] \\
        [--threads 2] [--rate-pps 1000000] [--count 10000000] [--size 64] [--dry-run]

pktgen sends UDP. Every packet takes a source address at random from --src
(198.18.0.1-198.18.0.254 for the default /24: pktgen's random range leaves out
its upper end, which here is the broadcast address) and a source port at random
from a range sized so that sources x ports = --flows distinct 5-tuples. (pktgen's
own `flows`/`flowlen` settings vary the destination address only, so they are
not used: the destination is the VIP.) Each thread is a kpktgend on its own CPU
with its own TX queue; --rate-pps and --count are split between the threads.

--dry-run prints what would be written where, one `FILE: COMMAND` line each,
and touches nothing: the way to check the configuration on a machine without
the pktgen module (CONFIG_NET_PKTGEN)."""
from __future__ import annotations

import argparse
import ipaddress
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc/net/pktgen")
PORT_LOW = 1024  # source ports start here (below: well-known ports)


@dataclass(frozen=True)
class Plan:
    dev: str
    vip: str
    port: int
    dst_mac: str
    src: ipaddress.IPv4Network
    flows: int
    threads: int
    cpus: tuple[int, ...]
    rate_pps: int          # 0: as fast as the NIC takes them
    count: int             # 0: until stopped
    size: int              # frame bytes without the FCS
    burst: int
    src_mac: str | None

    @property
    def src_first(self) -> ipaddress.IPv4Address:
        return self.src.network_address + (1 if self.src.num_addresses > 2 else 0)

    @property
    def src_end(self) -> ipaddress.IPv4Address:
        """pktgen draws random addresses from [src_min, src_max): src_max is left out."""
        last = self.src.broadcast_address if self.src.num_addresses > 2 else \
            self.src.broadcast_address + 1
        return last

    @property
    def sources(self) -> int:
        return int(self.src_end) - int(self.src_first)

    @property
    def ports(self) -> int:
        # udp_src_max is a 16-bit field and left out of the range: 65535 at most
        return min(65535 - PORT_LOW, max(1, math.ceil(self.flows / self.sources)))

    @property
    def distinct_flows(self) -> int:
        return self.sources * self.ports

    def devices(self) -> list[str]:
        return [f"{self.dev}@{t}" for t in range(self.threads)]

    def commands(self) -> list[tuple[str, str]]:
        """(file under /proc/net/pktgen, command) in the order they are written."""
        out = [("pgctrl", "reset")]
        for t, dev in enumerate(self.devices()):
            out += [(f"kpktgend_{self.cpus[t]}", "rem_device_all"),
                    (f"kpktgend_{self.cpus[t]}", f"add_device {dev}")]
        per_count = self.count // self.threads if self.count else 0
        per_rate = self.rate_pps // self.threads if self.rate_pps else 0
        for t, dev in enumerate(self.devices()):
            cmds = [
                f"count {per_count + (self.count % self.threads if t == 0 else 0)}",
                "clone_skb 0",  # a fresh packet each time: every packet its own flow
                f"pkt_size {self.size}",
                f"burst {self.burst}",
                f"ratep {per_rate}" if per_rate else "delay 0",
                f"queue_map_min {t}",
                f"queue_map_max {t}",
                f"dst {self.vip}",
                f"dst_mac {self.dst_mac}",
                f"src_min {self.src_first}",
                f"src_max {self.src_end}",
                "flag IPSRC_RND",
                f"udp_src_min {PORT_LOW}",
                f"udp_src_max {PORT_LOW + self.ports}",
                "flag UDPSRC_RND",
                f"udp_dst_min {self.port}",
                f"udp_dst_max {self.port}",
            ]
            if self.src_mac:
                cmds.append(f"src_mac {self.src_mac}")
            out += [(dev, c) for c in cmds]
        return out

    def describe(self) -> list[str]:
        per = (f"{self.rate_pps:,} pps in all ({self.rate_pps // self.threads:,} per thread)"
               if self.rate_pps else "as fast as the NIC takes them (delay 0)")
        return [
            (f"device: {self.dev}, {self.threads} thread(s) on CPU(s) "
             f"{','.join(map(str, self.cpus[:self.threads]))}, one TX queue each"),
            f"destination: {self.vip}:{self.port}/udp, MAC {self.dst_mac}",
            (f"flows: {self.distinct_flows:,} distinct 5-tuples = {self.sources} sources in "
             f"[{self.src_first}, {self.src_end}) x {self.ports} source ports in "
             f"[{PORT_LOW}, {PORT_LOW + self.ports}), drawn at random for every packet"),
            f"rate: {per}",
            f"count: {self.count:,} packets" if self.count else "count: until stopped (Ctrl-C)",
            f"size: {self.size} bytes per frame (without FCS)",
        ]


def parse(argv=None) -> tuple[Plan, argparse.Namespace]:
    ap = argparse.ArgumentParser(prog="python3 -m bench.hardware.pktgen",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dev", required=True, help="the sending NIC, e.g. eth1")
    ap.add_argument("--dst-mac", required=True,
                    help="MAC of the LB's NIC (or of the router in front of it)")
    ap.add_argument("--vip", default="198.18.10.10", help="VIP address (default 198.18.10.10)")
    ap.add_argument("--port", type=int, default=53, help="VIP's UDP port (default 53)")
    ap.add_argument("--src", default="198.18.0.0/24", help="client sources (default 198.18.0.0/24)")
    ap.add_argument("--flows", type=int, default=65536,
                    help="distinct 5-tuples wanted (default 65536)")
    ap.add_argument("--threads", type=int, default=1, help="kpktgend threads (default 1)")
    ap.add_argument("--cpus", help="CPUs of the threads, comma-separated (default 0,1,...)")
    ap.add_argument("--rate-pps", type=int, default=0,
                    help="packets per second in all; 0 = as fast as possible (default)")
    ap.add_argument("--count", type=int, default=10_000_000,
                    help="packets in all; 0 = until Ctrl-C (default 10,000,000)")
    ap.add_argument("--duration", type=float, help="stop after this many seconds")
    ap.add_argument("--size", type=int, default=64,
                    help="frame size without FCS, 60-9000 (default 64)")
    ap.add_argument("--burst", type=int, default=1,
                    help="packets queued per doorbell (xmit_more; default 1)")
    ap.add_argument("--src-mac", help="source MAC (default: the device's own)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the configuration, write nothing")
    a = ap.parse_args(argv)
    try:
        vip = ipaddress.IPv4Address(a.vip)
        src = ipaddress.IPv4Network(a.src, strict=True)
    except ValueError as e:
        ap.error(f"{e} (pktgen here sends IPv4: give an IPv4 VIP and an IPv4 prefix)")
    if not 1 <= a.port <= 65535:
        ap.error(f"--port {a.port}: give 1-65535")
    if a.flows < 1:
        ap.error("--flows: give at least 1")
    if a.threads < 1:
        ap.error("--threads: give at least 1")
    if not 60 <= a.size <= 9000:
        ap.error(f"--size {a.size}: give 60-9000 bytes")
    if a.rate_pps < 0 or a.count < 0:
        ap.error("--rate-pps and --count cannot be negative")
    mac = a.dst_mac.lower()
    if len(mac.split(":")) != 6 or not all(len(x) == 2 for x in mac.split(":")):
        ap.error(f"--dst-mac {a.dst_mac!r}: write six hex bytes, 02:00:00:00:01:01")
    cpus = tuple(int(c) for c in a.cpus.split(",")) if a.cpus else tuple(range(a.threads))
    if len(cpus) < a.threads:
        ap.error(f"--cpus names {len(cpus)} CPU(s) for {a.threads} threads")
    plan = Plan(a.dev, str(vip), a.port, mac, src, a.flows, a.threads, cpus, a.rate_pps,
                a.count, a.size, a.burst, a.src_mac)
    return plan, a


def _write(name: str, cmd: str) -> None:
    path = PROC / name
    with open(path, "w") as f:
        f.write(cmd + "\n")
    if name not in ("pgctrl",) and not name.startswith("kpktgend_"):
        result = [ln for ln in path.read_text().splitlines() if ln.startswith("Result:")]
        if result and not result[-1].startswith("Result: OK"):
            raise SystemExit(f"pktgen refused `{cmd}` on {name}: {result[-1]}")


def _ensure_pktgen() -> None:
    if PROC.is_dir():
        return
    subprocess.run(["modprobe", "pktgen"], capture_output=True, check=False)
    if not PROC.is_dir():
        raise SystemExit("the kernel has no pktgen (CONFIG_NET_PKTGEN; `modprobe pktgen` found "
                         "no module): use --dry-run to see the configuration")


def main(argv=None) -> int:
    plan, args = parse(argv)
    header = [f"# {line}" for line in plan.describe()]
    if args.dry_run:
        print("\n".join(header))
        for name, cmd in plan.commands():
            print(f"{PROC / name}: {cmd}")
        print(f"{PROC / 'pgctrl'}: start")
        return 0
    if not Path(f"/sys/class/net/{plan.dev}").exists():
        print(f"no network device {plan.dev!r} here", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("pktgen needs root", file=sys.stderr)
        return 2
    try:
        _ensure_pktgen()
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    print("\n".join(header), flush=True)
    for name, cmd in plan.commands():
        _write(name, cmd)
    timer = None
    if args.duration:
        timer = threading.Timer(args.duration, _write, ("pgctrl", "stop"))
        timer.start()
    started = time.time()
    try:
        _write("pgctrl", "start")  # returns when every thread has sent its count, or on stop
    except KeyboardInterrupt:
        _write("pgctrl", "stop")
    finally:
        if timer:
            timer.cancel()
    print(f"ran {time.time() - started:.1f} s")
    for dev in plan.devices():
        for line in (PROC / dev).read_text().splitlines():
            if line.strip().startswith(("Result:", "pkts-sofar")) or "pps" in line:
                print(f"{dev}: {line.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
