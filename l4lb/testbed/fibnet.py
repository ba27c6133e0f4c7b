"""A namespace that stands for an LB node's routing, for the kernel fixtures
and the benchmark of next_hop fib: BPF_PROG_TEST_RUN asks the FIB of the
namespace of the thread that runs it, so the program runs on this Node's
thread, with an ingress interface of it.

    lb0  198.18.1.1/29  fd00:198:18:1:1::1/80   routers R1 (.2, ::2, a permanent neighbour)
                                                 and R1b (.3, ::3, no neighbour entry)
    lb1  198.18.1.9/29  fd00:198:18:1:2::1/80   router R2 (.10, ::2, a permanent neighbour)

    198.18.2.0/26,   fd00:198:18:2::/66        via R1 on lb0
    198.18.2.64/26,  fd00:198:18:2:4000::/66 via R1b on lb0 (no neighbour: NO_NEIGH)
    198.18.2.128/26, fd00:198:18:2:8000::/66 via R2 on lb1
    198.18.2.192/26, fd00:198:18:2:c000::/66 unreachable

lb0 and lb1 are veth ends whose peers (lb0p, lb1p) stay in the namespace
down to nothing: no traffic leaves it. Forwarding is on (the FIB answers
only for interfaces that forward)."""
from __future__ import annotations

import subprocess

from .common import PREFIX, TestbedError
from .namespaces import Node, create_ns, next_tag, remove_ns, sweep

R1_MAC, R1B_MAC, R2_MAC = "02:00:00:00:0f:01", "02:00:00:00:0f:02", "02:00:00:00:0f:03"
LB0_MAC, LB1_MAC = "02:00:00:00:01:01", "02:00:00:00:01:02"
VIA_R1 = ("198.18.2.1", "fd00:198:18:2::1")          # inside the ranges via R1
VIA_R1B = ("198.18.2.65", "fd00:198:18:2:4000::1")  # via R1b, whose MAC is unknown
VIA_R2 = ("198.18.2.129", "fd00:198:18:2:8000::1")  # via R2 on lb1
UNREACHABLE = ("198.18.2.193", "fd00:198:18:2:c000::1")


class FibNet:
    """The namespace, its Node (a thread inside it) and the interfaces' indexes."""

    def __init__(self):
        sweep()
        self.ns = f"{PREFIX}-{next_tag()}-fib"
        create_ns(self.ns)
        try:
            self._build()
            self.node = Node("fib", self.ns)
            self.lb0 = self.node.index("lb0")
            self.lb1 = self.node.index("lb1")
        except BaseException:
            remove_ns(self.ns)
            raise

    def ip(self, *args: str) -> None:
        r = subprocess.run(["ip", "-n", self.ns, *args], capture_output=True, text=True)
        if r.returncode:
            raise TestbedError(f"ip -n {self.ns} {' '.join(args)}: {r.stderr.strip()}")

    def sysctl(self, key: str, value: int) -> None:
        r = subprocess.run(["ip", "netns", "exec", self.ns, "sysctl", "-qw", f"{key}={value}"],
                           capture_output=True, text=True)
        if r.returncode:
            raise TestbedError(f"sysctl {key}={value} in {self.ns}: {r.stderr.strip()}")

    def _build(self) -> None:
        for key in ("net.ipv4.conf.all.forwarding", "net.ipv6.conf.all.forwarding",
                    "net.ipv6.conf.default.accept_dad", "net.ipv6.conf.all.accept_dad"):
            self.sysctl(key, 0 if "dad" in key else 1)
        for name, mac in (("lb0", LB0_MAC), ("lb1", LB1_MAC)):
            self.ip("link", "add", name, "address", mac, "type", "veth", "peer", "name", f"{name}p")
            self.ip("link", "set", f"{name}p", "up")
            self.ip("link", "set", name, "up")
        self.ip("addr", "add", "198.18.1.1/29", "dev", "lb0")
        self.ip("addr", "add", "198.18.1.9/29", "dev", "lb1")
        self.ip("-6", "addr", "add", "fd00:198:18:1:1::1/80", "dev", "lb0", "nodad")
        self.ip("-6", "addr", "add", "fd00:198:18:1:2::1/80", "dev", "lb1", "nodad")
        for addr, mac, dev in (("198.18.1.2", R1_MAC, "lb0"), ("fd00:198:18:1:1::2", R1_MAC, "lb0"),
                               ("198.18.1.10", R2_MAC, "lb1"), ("fd00:198:18:1:2::2", R2_MAC, "lb1")):
            self.ip("neigh", "replace", addr, "lladdr", mac, "dev", dev, "nud", "permanent")
        for dst, via, dev in (("198.18.2.0/26", "198.18.1.2", "lb0"),
                              ("fd00:198:18:2::/66", "fd00:198:18:1:1::2", "lb0"),
                              ("198.18.2.64/26", "198.18.1.3", "lb0"),
                              ("fd00:198:18:2:4000::/66", "fd00:198:18:1:1::3", "lb0"),
                              ("198.18.2.128/26", "198.18.1.10", "lb1"),
                              ("fd00:198:18:2:8000::/66", "fd00:198:18:1:2::2", "lb1")):
            self.ip("route", "add", dst, "via", via, "dev", dev)
        self.ip("route", "add", "unreachable", "198.18.2.192/26")
        self.ip("-6", "route", "add", "unreachable", "fd00:198:18:2:c000::/66")

    def forwarding(self, ifname: str, on: bool) -> None:
        self.sysctl(f"net.ipv4.conf.{ifname}.forwarding", int(on))
        self.sysctl(f"net.ipv6.conf.{ifname}.forwarding", int(on))

    def close(self) -> None:
        self.node.close()
        remove_ns(self.ns)

    def __enter__(self) -> "FibNet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
