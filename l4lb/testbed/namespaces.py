"""Network namespaces of the testbed: their names, a Node that works inside
one, stopping the processes that run in them, and the sweep that removes what
an interrupted run left behind.

Everything the testbed makes carries the prefix `l4lbtb` and the owner's pid
(namespaces `l4lbtb-<tag>-<role>`, the LB's interface and so its pinned maps
`/sys/fs/bpf/l4lb/l4lbtb<tag>`, temp dirs `/tmp/l4lbtb-<tag>-*`). A Testbed is
a context manager; teardown always runs. A run that was killed leaves them
behind, and the next Testbed removes every one whose owner process is gone.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from .common import NETNS_DIR, PIN_ROOT, PREFIX, TestbedError

# ---- names and leftovers ----------------------------------------------------------------

_seq = 0
_seq_lock = threading.Lock()


def next_tag() -> str:
    """pid in hex and a sequence digit: unique per live testbed, and the pid can be read back."""
    global _seq
    with _seq_lock:
        _seq += 1
        return f"{os.getpid():x}{_seq % 16:x}"


_NS_RE = re.compile(rf"^{PREFIX}-([0-9a-f]+)[0-9a-f]-")
_OWNED_RE = re.compile(rf"^{PREFIX}-?([0-9a-f]+)[0-9a-f](?:$|-)")


def alive(pid: int) -> bool:
    """pid exists and is not a zombie (an owner killed but not yet reaped is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def ns_pids(ns: str) -> list[int]:
    """Processes whose network namespace is ns (what `ip netns pids` reports)."""
    try:
        target = os.stat(NETNS_DIR / ns)
    except FileNotFoundError:
        return []
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == os.getpid():
            continue
        try:
            st = os.stat(f"/proc/{p}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            pids.append(int(p))
    return pids


def stop_pids(pids: list[int], grace: float = 5.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def stop_popen(p: subprocess.Popen, timeout: float = 5.0) -> None:
    if p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def napi_threads(ifname: str) -> list[int]:
    """The pids of ifname's NAPI threads (named napi/<ifname>-<napi id>)."""
    prefix, pids = f"napi/{ifname}-", []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            if Path(f"/proc/{p}/comm").read_text().startswith(prefix):
                pids.append(int(p))
        except OSError:
            continue
    return pids


def create_ns(ns: str) -> None:
    from pyroute2 import netns  # noqa: PLC0415

    netns.create(ns)


def remove_ns(ns: str) -> None:
    from pyroute2 import netns  # noqa: PLC0415

    with contextlib.suppress(FileNotFoundError):
        netns.remove(ns)


def sweep(say: Callable[[str], None] | None = None) -> list[str]:
    """Removes what testbeds of processes that no longer exist left behind:
    their processes (by pid), namespaces, pinned maps and temp dirs. Returns
    what it removed. Live testbeds, including other processes', are left alone."""
    removed = []
    if NETNS_DIR.is_dir():
        for ns in sorted(os.listdir(NETNS_DIR)):
            m = _NS_RE.match(ns)
            if not m or alive(int(m[1], 16)):
                continue
            pids = ns_pids(ns)
            stop_pids(pids)
            removed += [f"process {p}" for p in pids]
            remove_ns(ns)
            removed.append(f"namespace {ns}")
    for root in (PIN_ROOT, Path(tempfile.gettempdir())):
        if not root.is_dir():
            continue
        for d in sorted(os.listdir(root)):
            m = _OWNED_RE.match(d)
            if m and not alive(int(m[1], 16)):
                shutil.rmtree(root / d, ignore_errors=True)
                removed.append(str(root / d))
    if removed and say:
        say(f"removed leftovers of an interrupted run: {', '.join(removed)}")
    return removed


# ---- one namespace ----------------------------------------------------------------------

def _enter(ns: str) -> None:
    from pyroute2 import netns  # noqa: PLC0415

    netns.setns(ns, flags=0)  # setns(2) moves only the calling thread


class Node:
    """A namespace with one thread that lives in it. Sockets (netlink
    included) take the namespace of the thread that creates them and keep it,
    so everything that must be made inside the namespace is made on that
    thread and then used from anywhere: no proxy process, no `ip netns exec`."""

    def __init__(self, role: str, ns: str):
        self.role = role
        self.ns = ns
        self._thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, initializer=_enter, initargs=(ns,), thread_name_prefix=f"ns-{role}")
        self._ipr = None

    def run(self, fn: Callable, *args, **kwargs):
        """fn(*args, **kwargs) on the namespace's thread."""
        return self._thread.submit(fn, *args, **kwargs).result()

    @property
    def ipr(self):
        """The namespace's netlink socket (pyroute2 IPRoute, made inside it)."""
        if self._ipr is None:
            from pyroute2 import IPRoute  # noqa: PLC0415

            self._ipr = self.run(IPRoute)
        return self._ipr

    def close(self) -> None:
        if self._ipr is not None:
            with contextlib.suppress(Exception):
                self._ipr.close()
            self._ipr = None
        self._thread.shutdown(wait=True)

    def __enter__(self) -> "Node":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def socket(self, family: int, type_: int, proto: int = 0) -> socket.socket:
        return self.run(socket.socket, family, type_, proto)

    def index(self, ifname: str) -> int:
        idx = self.ipr.link_lookup(ifname=ifname)
        if not idx:
            raise TestbedError(f"{self.role}: no interface {ifname}")
        return idx[0]

    def sysctl(self, values: dict[str, object]) -> None:
        """Writes net.* sysctls of this namespace (/proc/sys/net is per namespace)."""
        def write():
            for k, v in values.items():
                Path("/proc/sys", *k.split(".")).write_text(f"{v}\n")
        self.run(write)

    def read_sysctl(self, key: str) -> str:
        return self.run(lambda: Path("/proc/sys", *key.split(".")).read_text().strip())

    def snmp(self) -> dict[str, int]:
        """The namespace's IP/TCP/UDP counters (/proc/net/snmp and snmp6), as
        'Tcp.InCsumErrors', 'Udp6InCsumErrors', ..."""
        def read():
            out = {}
            lines = Path("/proc/thread-self/net/snmp").read_text().splitlines()
            for head, vals in zip(lines[::2], lines[1::2]):
                proto, names = head.split(":", 1)
                for n, v in zip(names.split(), vals.split(":", 1)[1].split()):
                    out[f"{proto}.{n}"] = int(v)
            for line in Path("/proc/thread-self/net/snmp6").read_text().splitlines():
                n, v = line.split()
                out[n] = int(v)
            return out
        return self.run(read)

    def nsenter(self) -> list[str]:
        """The prefix that runs a command in this namespace. nsenter changes only
        the network namespace: `ip netns exec` would also remount /sys and so
        hide the BPF filesystem (pinned maps) from `l4lb run`."""
        return ["nsenter", f"--net={NETNS_DIR / self.ns}"]

    def napi_threaded(self, ifname: str, on: bool = True, realtime: bool = False) -> None:
        """The interface's NAPI in a kernel thread of its own instead of the
        sending CPU's softirq: on veth, the receiver's work otherwise runs on
        the sender's CPU, inline; a real host's NIC is served by its own
        cores. (sysfs shows a namespace's devices only once mounted inside it.)
        realtime: the threads run SCHED_FIFO at the lowest priority, ahead of
        every ordinary task, as softirq work runs ahead of tasks on a real host."""
        q = subprocess.run(self.nsenter() + ["unshare", "-m", "sh", "-c", "mount -t sysfs sysfs /sys && "
                                             f"echo {int(on)} > /sys/class/net/{ifname}/threaded"],
                           capture_output=True, text=True)
        if q.returncode:
            raise TestbedError(f"threaded NAPI on {ifname} in {self.ns}: {q.stderr.strip()}")
        if on and realtime:
            threads = napi_threads(ifname)
            if not threads:
                raise TestbedError(f"no NAPI thread of {ifname} in {self.ns}")
            for pid in threads:
                os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(1))

    def gro(self, ifname: str, on: bool = True) -> None:
        """GRO on a veth end; it also gives that end a NAPI of its own (kernel 5.13+)."""
        q = subprocess.run(self.nsenter() + ["ethtool", "-K", ifname, "gro", "on" if on else "off"],
                           capture_output=True, text=True)
        if q.returncode:
            raise TestbedError(f"ethtool -K {ifname} gro in {self.ns}: {q.stderr.strip()}")

    def qdisc_stats(self, ifname: str) -> dict[str, int]:
        """The root qdisc's counters on ifname (packets, drops, requeues...)."""
        q = subprocess.run(self.nsenter() + ["tc", "-s", "-j", "qdisc", "show", "dev", ifname],
                           capture_output=True, text=True)
        if q.returncode:
            raise TestbedError(f"tc -s qdisc show dev {ifname} in {self.ns}: {q.stderr.strip()}")
        root = next(d for d in json.loads(q.stdout) if d.get("root"))
        return {k: v for k, v in root.items() if isinstance(v, int)}

    def link_stats(self, ifname: str) -> dict[str, int]:
        return dict(self.ipr.link("get", index=self.index(ifname))[0].get_attr("IFLA_STATS64"))

    def route_mtu(self, dst: str) -> int | None:
        """The path MTU the kernel has cached for dst (after an ICMP 'too big'), if any."""
        for r in self.ipr.route("get", dst=dst):
            metrics = r.get_attr("RTA_METRICS")
            mtu = metrics.get_attr("RTAX_MTU") if metrics else None
            if mtu:
                return mtu
        return None
