"""`l4lb lab up [--fleet N]` / `l4lb lab down`: the demo's testbed (or the
fleet testbed) left running, to explore by hand: curl-like questions to the
VIPs from a client namespace, `l4lb stats --watch` on a node, `birdc` on the
router, a node drained or killed.

The testbed lives as long as the process that built it (its namespaces carry
that process's pid, and the next testbed sweeps away those of dead owners):
`lab up` starts that process in the background (`l4lb lab serve`, a session
of its own), waits until it has built and configured the testbed, and prints
how to reach each part; `lab down` stops it by its pid (SIGTERM: it tears the
testbed down). The lab's description and log are LAB_FILE and LAB_LOG."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from l4lb import consts
from l4lb.errors import L4lbError, StateError

LAB_FILE = Path(consts.LOCK_ROOT) / "lab.json"
LAB_LOG = Path(consts.LOCK_ROOT) / "lab.log"
BUILD_TIMEOUT = 600.0


def add_parser(sub) -> None:
    lab = sub.add_parser("lab", help="leave a testbed running to explore by hand (up, down, show)",
                         epilog="examples:\n  l4lb lab up               # the demo's testbed: clients, router, LB, backends\n"
                                "  l4lb lab up --fleet 3     # 3 LB nodes behind a BIRD router\n"
                                "  l4lb lab show\n  l4lb lab down",
                         formatter_class=argparse.RawDescriptionHelpFormatter).add_subparsers(dest="verb", required=True)
    up = lab.add_parser("up", help="build the testbed and leave it running")
    up.add_argument("--fleet", type=int, nargs="?", const=3, metavar="N", help="N LB nodes (default 3) behind a router")
    up.add_argument("--decap", choices=["auto", "xdp", "ipip"], default="auto")
    up.set_defaults(func=cmd_up)
    lab.add_parser("show", help="how to reach the running lab").set_defaults(func=cmd_show)
    lab.add_parser("down", help="tear the running lab down").set_defaults(func=cmd_down)
    serve = lab.add_parser("serve", help=argparse.SUPPRESS)
    serve.add_argument("--fleet", type=int, default=0)
    serve.add_argument("--decap", default="auto")
    serve.set_defaults(func=cmd_serve)


def _alive(pid: int) -> bool:
    from l4lb.testbed import alive  # noqa: PLC0415  (the testbed loads only when a lab verb runs)

    return alive(pid)


def _running() -> dict | None:
    try:
        doc = json.loads(LAB_FILE.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and _alive(int(doc.get("pid", 0))) else None


def cmd_up(args) -> int:
    from l4lb.testbed.fleet import MAX_NODES  # noqa: PLC0415

    if args.fleet is not None and not 1 <= args.fleet <= MAX_NODES:
        raise L4lbError(f"--fleet {args.fleet}: use 1-{MAX_NODES} LB nodes")
    lab = _running()
    if lab:
        raise StateError(f"a lab is running already (pid {lab['pid']}); `l4lb lab down` first, or `l4lb lab show`")
    LAB_FILE.unlink(missing_ok=True)
    LAB_FILE.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "control.cli", "lab", "serve", "--fleet", str(args.fleet or 0), "--decap", args.decap]
    with open(LAB_LOG, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=Path(__file__).resolve().parents[1])
    print(f"building the lab (pid {proc.pid}, log {LAB_LOG}) ...", flush=True)
    deadline = time.monotonic() + BUILD_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(LAB_LOG.read_text(errors="replace").splitlines()[-15:])
            raise StateError(f"the lab failed to build (exit {proc.returncode}): {tail}")
        lab = _running()
        if lab and lab.get("ready"):
            _print(lab)
            return 0
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGTERM)
    raise StateError(f"the lab was not ready within {BUILD_TIMEOUT:.0f} s; see {LAB_LOG}")


def cmd_show(args) -> int:
    lab = _running()
    if not lab:
        print("no lab is running (l4lb lab up)")
        return 1
    _print(lab)
    return 0


def cmd_down(args) -> int:
    lab = _running()
    if not lab:
        LAB_FILE.unlink(missing_ok=True)
        print("no lab is running")
        return 0
    pid = int(lab["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 120
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        raise StateError(f"the lab (pid {pid}) did not stop within 120 s; see {LAB_LOG}")
    LAB_FILE.unlink(missing_ok=True)
    print(f"lab down: namespaces {lab['namespaces']}, its processes and pinned maps removed")
    return 0


def _print(lab: dict) -> None:
    ns = lab["ns"]
    py = lab["python"]
    enter = lambda role: f"nsenter --net=/run/netns/{ns[role]}"  # noqa: E731
    print(f"lab up (pid {lab['pid']}): {lab['what']}; namespaces {lab['namespaces']}")
    print(f"  VIPs (TCP and UDP port 80; each backend answers a line with its name): {', '.join(lab['vips'])}")
    print("  the backends' own answering server holds TCP and UDP port 80 on every address: to try your own\n"
          "  server (nginx, iperf3 -s -B VIP: UDP servers must answer from the VIP, docs/dsr-backend.md),\n"
          "  give it another port and add a VIP for that port, e.g.\n"
          f"    {lab['l4lb']} vip add {lab['vips'][0]}:8080/tcp --backend BACKEND "
          f"--server {next(iter(lab['servers'].values()))}")
    print("  ask a VIP from a client:")
    for vip in lab["vips"]:
        print(f"    {enter('c1')} {py} -m l4lb.testbed ask {vip}")
    print("  a shell in a namespace (roles: " + ", ".join(ns) + "):")
    print(f"    {enter('c1')} bash")
    verbs = "status, stats --watch, vip list, flows show VIP" + (", node drain" if lab.get("fleet") else "")
    for role, server in lab["servers"].items():
        print(f"  {role}: {lab['l4lb']} status --server {server}   (and {verbs})")
    if lab.get("fleet"):
        servers = " ".join(f"--server {s}" for s in lab["servers"].values())
        print(f"  every node: {lab['l4lb']} status {servers}")
        print(f"  the router's routes: {enter('router')} ip route; birdc -s {lab['birds']['router']} show route")
        for role, ctl in lab["birds"].items():
            if role != "router":
                print(f"  {role}'s BIRD: birdc -s {ctl} show protocols   (stop it: birdc -s {ctl} down)")
    print(f"  tear down: {lab['l4lb']} lab down")


def cmd_serve(args) -> int:
    """Builds the testbed, configures the VIPs on every LB, writes LAB_FILE
    and waits for SIGTERM; then tears down."""
    from l4lb.testbed import Fleet, Testbed  # noqa: PLC0415

    from .client import Client  # noqa: PLC0415
    from .l4lb.v1 import l4lb_pb2 as pb  # noqa: PLC0415
    from .launcher import launcher  # noqa: PLC0415

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    say = lambda m: print(m, flush=True)  # noqa: E731
    bed = Fleet(nodes=args.fleet, decap=args.decap, progress=say, launcher=launcher()) if args.fleet else \
        Testbed(decap=args.decap, progress=say, launcher=launcher())
    try:
        bed.__enter__()
        lbs = bed.lbs if args.fleet else [bed.lb]
        lines = ["vips:"]
        for addr, fam in ((bed.vip4(0), "addr4"), (bed.vip6(0), "addr6")):
            for proto in ("tcp", "udp"):
                lines += [f'  - address: "{addr}"', "    port: 80", f"    protocol: {proto}", "    backends:"]
                lines += [f'      - address: "{getattr(b, fam)}"' for b in bed.backends]
        for lb in lbs:
            with Client(lb.grpc_address) as c:
                c.call("Apply", pb.ApplyRequest(config_yaml="\n".join(lines) + "\n"))
        if args.fleet:
            for vip in (bed.vip4(0), bed.vip6(0)):
                bed.wait_nexthops(vip, lbs)
        doc = {"pid": os.getpid(), "ready": True, "fleet": args.fleet, "namespaces": bed.ns_name("*"),
               "ns": {n.role: n.ns for n in bed.nodes}, "vips": [bed.vip4(0), bed.vip6(0)],
               "what": (f"{args.fleet} LB nodes behind a BIRD router" if args.fleet else "one LB behind a router") +
                       f", {len(bed.clients)} clients, {len(bed.backends)} backends",
               "servers": {lb.role: lb.grpc_address for lb in lbs},
               "python": sys.executable, "l4lb": str(Path(sys.executable).with_name("l4lb")),
               "birds": ({"router": str(bed.router_bird.ctl), **{lb.role: str(lb.bird.ctl) for lb in lbs}}
                         if args.fleet else {})}
        tmp = LAB_FILE.with_name(LAB_FILE.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, LAB_FILE)
        say("lab ready")
        while not stop:
            time.sleep(0.5)
    finally:
        say("tearing down")
        bed.close()
        try:
            if json.loads(LAB_FILE.read_text()).get("pid") == os.getpid():
                LAB_FILE.unlink()
        except (OSError, ValueError):
            pass
    return 0
