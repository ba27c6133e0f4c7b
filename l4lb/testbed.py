"""Network namespaces with real TCP and UDP through the load balancer, for the
end-to-end tests, `l4lb demo` and the benchmarks.

    c1 ─┐                        ┌─ b1
        ├─ brc ─ router ─ brb ───┼─ b2      each ─ between namespaces is a veth
    c2 ─┘          │             └─ b3      pair with 2 queues; brc and brb are
                   lb                       bridges in the router's namespace

* Clients (198.18.0.0/24, fd00:198:18::/64) route everything to the router.
* The router routes the VIP prefixes (198.18.10.0/24, fd00:198:18:10::/64)
  and the encapsulation sources (198.18.20.0/24, fd00:198:18:20::/64) to the
  LB's link address (198.18.1.2, fd00:198:18:1::2).
* The LB runs a real `l4lb run` (a subprocess entered into the LB namespace
  with nsenter, so that it sees the BPF filesystem), attached natively to its
  veth; its gateway is the router's MAC on that link, so encapsulated packets
  go back to the router, which routes them to the backend by the outer
  destination.
* Backends (198.18.2.0/24, fd00:198:18:2::/64) hold every VIP on their
  loopback, decapsulate with the kernel's ipip/ip6tnl devices or with the XDP
  decap program (xdp/decap.c), and answer straight to the client through the
  router (DSR): a reply never passes the LB.

Choices the veth links force, and why:
* XDP_TX on a veth hands the frame to the peer's NAPI, which exists only when
  the peer has an XDP program or GRO enabled (kernel 5.13+). The router's end
  of the LB link gets the decap program with no addresses, which passes every
  frame: it works on every kernel with veth XDP, shows in `ip link` why
  XDP_TX works, and its `pass` counter is what the router received from the LB.
* A TCP/UDP packet sent from a namespace over a veth keeps a partial checksum
  (CHECKSUM_PARTIAL: only the pseudo-header sum) until some device fills it in;
  XDP does not, and after XDP_TX the frame has lost the skb that said so, so
  the backend would drop it as corrupt. Checksum offload is therefore off
  (ethtool -K eth0 tx off) on the clients' veths, where such packets start.
* rp_filter is 0 on the backends (an inner packet that came out of a tunnel
  device arrives on a device that is not the route back to the client) and on
  the router (replies from a VIP address come from the backends' side, while
  the route to the VIPs points at the LB).

Everything this module makes carries the prefix `l4lbtb` and the owner's pid
(namespaces `l4lbtb-<tag>-<role>`, the LB's interface and so its pinned maps
`/sys/fs/bpf/l4lb/l4lbtb<tag>`, temp dirs `/tmp/l4lbtb-<tag>-*`). A Testbed is
a context manager; teardown always runs. A run that was killed leaves them
behind, and the next Testbed removes every one whose owner process is gone.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import ipaddress
import logging
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import bpf
from .errors import L4lbError

log = logging.getLogger("l4lb.testbed")

PREFIX = "l4lbtb"
NETNS_DIR = Path("/run/netns")
PIN_ROOT = Path("/sys/fs/bpf/l4lb")
SERVICE_PORT = 80  # TCP and UDP port of the backends' servers (and so of the VIPs)
DECAP_MODES = ("auto", "xdp", "ipip")

NET4 = {"clients": "198.18.0", "lb": "198.18.1", "backends": "198.18.2", "vips": "198.18.10"}
NET6 = {"clients": "fd00:198:18:0", "lb": "fd00:198:18:1", "backends": "fd00:198:18:2", "vips": "fd00:198:18:10"}
VIP_NET4, VIP_NET6 = "198.18.10.0/24", "fd00:198:18:10::/64"
ENCAP_NET4, ENCAP_NET6 = "198.18.20.0/24", "fd00:198:18:20::/64"
ROUTER_HOST = 254  # the router's host number on the client and backend bridges
MTU = 1500
TIMEOUT = 20.0  # seconds any one readiness wait may take


class TestbedError(L4lbError):
    """The testbed could not be built or a step of traffic failed; the message says which."""

    __test__ = False  # not a pytest test class


# ---- names and leftovers ----------------------------------------------------------------

_seq = 0
_seq_lock = threading.Lock()


def _next_tag() -> str:
    """pid in hex and a sequence digit: unique per live testbed, and the pid can be read back."""
    global _seq
    with _seq_lock:
        _seq += 1
        return f"{os.getpid():x}{_seq % 16:x}"


_NS_RE = re.compile(rf"^{PREFIX}-([0-9a-f]+)[0-9a-f]-")
_OWNED_RE = re.compile(rf"^{PREFIX}-?([0-9a-f]+)[0-9a-f](?:$|-)")


def _alive(pid: int) -> bool:
    """pid exists and is not a zombie (an owner killed but not yet reaped is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _ns_pids(ns: str) -> list[int]:
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


def _stop_pids(pids: list[int], grace: float = 5.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _remove_ns(ns: str) -> None:
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
            if not m or _alive(int(m[1], 16)):
                continue
            pids = _ns_pids(ns)
            _stop_pids(pids)
            removed += [f"process {p}" for p in pids]
            _remove_ns(ns)
            removed.append(f"namespace {ns}")
    for root in (PIN_ROOT, Path(tempfile.gettempdir())):
        if not root.is_dir():
            continue
        for d in sorted(os.listdir(root)):
            m = _OWNED_RE.match(d)
            if m and not _alive(int(m[1], 16)):
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


@dataclass
class Conn:
    """A TCP connection from a client to an address (a VIP, usually). Every
    ask() sends one line and reads the server's answer: its name, then the line."""

    sock: socket.socket
    client: str
    src: str
    sport: int
    dst: str
    dport: int
    backend: str = ""

    def ask(self, text: str = "hello", timeout: float = 5.0) -> str:
        """Sends text, returns the name of the backend that answered."""
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(text.encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise TestbedError(f"{self}: the server closed the connection")
                buf += chunk
        except OSError as e:
            raise TestbedError(f"{self}: {e}") from e
        name, _, echo = buf.decode().rstrip("\n").partition(" ")
        if echo != text:
            raise TestbedError(f"{self}: the answer does not echo what was sent ({len(echo)} of {len(text)} bytes)")
        self.backend = self.backend or name
        return name

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __str__(self) -> str:
        return f"tcp {self.client} {_hostport(self.src, self.sport)} -> {_hostport(self.dst, self.dport)}"


@dataclass
class UdpFlow:
    """A UDP flow (one source port) from a client."""

    sock: socket.socket
    client: str
    src: str
    sport: int
    dst: str
    dport: int

    def ask(self, text: str = "hello", timeout: float = 2.0) -> str:
        self.sock.settimeout(timeout)
        try:
            self.sock.send(text.encode())
            data = self.sock.recv(65536)
        except OSError as e:
            raise TestbedError(f"udp {self.client} {_hostport(self.src, self.sport)} -> "
                               f"{_hostport(self.dst, self.dport)}: {e}") from e
        name, _, echo = data.decode().partition(" ")
        if echo != text:
            raise TestbedError(f"udp answer {data[:40]!r} does not echo {text!r}")
        return name

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _family(address: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


class Client(Node):
    def __init__(self, role: str, ns: str, host: int):
        super().__init__(role, ns)
        self.addr4 = f"{NET4['clients']}.{host}"
        self.addr6 = f"{NET6['clients']}::{host}"

    def connect(self, address: str, port: int = SERVICE_PORT, timeout: float = 5.0) -> Conn:
        sock = self.socket(_family(address), socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
        except OSError as e:
            sock.close()
            raise TestbedError(f"tcp {self.role} -> {_hostport(address, port)}: {e}") from e
        src, sport = sock.getsockname()[:2]
        return Conn(sock, self.role, src, sport, address, port)

    def udp(self, address: str, port: int = SERVICE_PORT) -> UdpFlow:
        sock = self.socket(_family(address), socket.SOCK_DGRAM)
        sock.connect((address, port))
        src, sport = sock.getsockname()[:2]
        return UdpFlow(sock, self.role, src, sport, address, port)

    def ping(self, address: str, timeout: float = 2.0) -> dict | None:
        """One ICMP echo; returns {'src', 'ttl'?, 'checksum_ok'} of the reply, or None."""
        v6 = _family(address) == socket.AF_INET6
        sock = self.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                           socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
        ident, payload = os.getpid() & 0xFFFF, os.urandom(16)
        msg = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, ident, 1) + payload
        if not v6:  # the kernel computes ICMPv6 checksums itself
            msg = msg[:2] + struct.pack("!H", inet_checksum(msg)) + msg[4:]
        deadline = time.monotonic() + timeout
        try:
            sock.sendto(msg, (address, 0))
            while (left := deadline - time.monotonic()) > 0:
                r, _, _ = select.select([sock], [], [], left)
                if not r:
                    break
                data, peer = sock.recvfrom(65536)
                icmp = data if v6 else data[(data[0] & 0x0F) * 4:]
                if len(icmp) < 8 or icmp[0] != (129 if v6 else 0):
                    continue
                if struct.unpack("!H", icmp[4:6])[0] != ident or icmp[8:] != payload:
                    continue
                return {"src": peer[0], "checksum_ok": v6 or inet_checksum(icmp) == 0}
        finally:
            sock.close()
        return None


def inet_checksum(data: bytes) -> int:
    """RFC 1071; 0 over a message whose checksum is right."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


class Backend(Node):
    def __init__(self, role: str, ns: str, host: int):
        super().__init__(role, ns)
        self.host = host
        self.addr4 = f"{NET4['backends']}.{host}"
        self.addr6 = f"{NET6['backends']}::{host}"
        self.decap: str = ""
        self.program = None  # the XDP decap program, in xdp mode
        self.server: subprocess.Popen | None = None
        self._base = {"decap4": 0, "decap6": 0}

    def _decap_raw(self) -> dict[str, int]:
        if self.decap == "xdp":
            from . import bpf, consts  # noqa: PLC0415

            s = bpf.percpu_sum(self.program.table(consts.MAP_DECAP_STATS))
            return {"decap4": s["decap4"], "decap6": s["decap6"]}
        return {"decap4": self.link_stats(TUNNEL4)["rx_packets"], "decap6": self.link_stats(TUNNEL6)["rx_packets"]}

    def decap_counts(self) -> dict[str, int]:
        """Packets decapsulated here since the testbed was built: decap4 (outer
        IPv4: 4in4) and decap6 (outer IPv6: 6in6 and 4in6), from the decap
        program's counters or the tunnel devices' rx_packets."""
        raw = self._decap_raw()
        return {k: raw[k] - self._base[k] for k in raw}


TUNNEL4, TUNNEL6 = "l4lbip4", "l4lbip6"


class Lb(Node):
    def __init__(self, role: str, ns: str, ifname: str, workdir: Path):
        super().__init__(role, ns)
        self.ifname = ifname
        self.addr4 = f"{NET4['lb']}.2"
        self.addr6 = f"{NET6['lb']}::2"
        self.workdir = workdir
        self.socket_path = workdir / "l4lb.sock"
        self.grpc_address = f"unix:{self.socket_path}"
        self.state_dir = workdir / "state"
        self.config = workdir / "lb.yaml"
        self.log_path = workdir / "l4lb-run.log"
        self.pin_dir = PIN_ROOT / ifname
        self.proc: subprocess.Popen | None = None
        self.run_args: list[str] = []

    def command(self, with_config: bool) -> list[str]:
        exe = Path(sys.executable).with_name("l4lb")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "control.cli"]
        cmd += ["run", "--interface", self.ifname, "--listen", self.grpc_address,
                "--state-dir", str(self.state_dir), "--attach-mode", "native", *self.run_args]
        return cmd + (["--config", str(self.config)] if with_config else [])

    def start(self, with_config: bool = False) -> None:
        """Starts `l4lb run` in the LB namespace. The first start passes the
        configuration file (gateway, encapsulation sources, MTU); a restart
        adopts the pinned maps and saved state instead, since a --config would
        make the running VIPs equal to the file's (none)."""
        if self.proc and self.proc.poll() is None:
            raise TestbedError("l4lb run is running already")
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        with open(self.log_path, "a") as logf:
            self.proc = subprocess.Popen(self.nsenter() + self.command(with_config), stdout=logf,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_healthy(self, timeout: float = 60.0) -> None:
        import grpc  # noqa: PLC0415
        from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TestbedError(f"l4lb run exited with status {self.proc.returncode}:\n{self.log_tail()}")
            if self.socket_path.exists():
                with contextlib.suppress(grpc.RpcError), grpc.insecure_channel(self.grpc_address) as ch:
                    r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            time.sleep(0.05)
        raise TestbedError(f"l4lb run did not serve within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM: `l4lb run` stops serving and leaves the program attached."""
        if not self.proc or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start(with_config=False)
        self.wait_healthy()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def program(self) -> tuple[int, str, str] | None:
        """(id, name, tag) of the XDP program on the LB's interface."""
        from . import netlink  # noqa: PLC0415

        return self.run(netlink.xdp_program, self.ifname)

    def detach(self) -> int:
        """Detaches the balancer (as an operator would by mistake); returns its id.
        `l4lb run` keeps the program loaded, so attach(id) puts it back."""
        prog = self.program()
        if not prog:
            raise TestbedError(f"no XDP program on {self.ifname}")
        self._bpftool("net", "detach", "xdpdrv", "dev", self.ifname)
        return prog[0]

    def attach(self, prog_id: int) -> None:
        self._bpftool("net", "attach", "xdpdrv", "id", str(prog_id), "dev", self.ifname)

    def _bpftool(self, *args: str) -> None:
        r = subprocess.run(self.nsenter() + ["bpftool", *args], capture_output=True, text=True)
        if r.returncode:
            raise TestbedError(f"bpftool {' '.join(args)}: {r.stderr.strip()}")

    @contextlib.contextmanager
    def sniff(self):
        """Captures what the LB's stack sees on its interface (AF_PACKET, after
        XDP: frames the program sent back with XDP_TX never show, frames it
        passed do). Yields a list that fills with (pkttype, frame) while open."""
        eth_p_all = 0x0003
        sock = self.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(eth_p_all))
        sock.bind((self.ifname, 0))
        sock.settimeout(0.05)
        frames: list[tuple[int, bytes]] = []
        stop = threading.Event()

        def loop():
            while not stop.is_set():
                try:
                    data, addr = sock.recvfrom(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                frames.append((addr[2], data))

        t = threading.Thread(target=loop, name="sniff", daemon=True)
        t.start()
        try:
            yield frames
        finally:
            stop.set()
            t.join()
            sock.close()


def ip_source(frame: bytes) -> str | None:
    """The IP source address of an Ethernet frame (untagged), if it is IP."""
    ethertype = frame[12:14]
    if ethertype == b"\x08\x00" and len(frame) >= 34:
        return str(ipaddress.ip_address(frame[26:30]))
    if ethertype == b"\x86\xdd" and len(frame) >= 54:
        return str(ipaddress.ip_address(frame[22:38]))
    return None


# ---- decapsulation --------------------------------------------------------------------------

_ipip_support: tuple[bool, str] | None = None


def ipip_support() -> tuple[bool, str]:
    """(True, '') when this kernel can make ipip and ip6tnl devices, else (False, why).
    Loads the modules if they exist, then tries both devices in a scratch namespace."""
    global _ipip_support
    if _ipip_support is not None:
        return _ipip_support
    from pyroute2 import netns  # noqa: PLC0415
    from pyroute2.netlink.exceptions import NetlinkError  # noqa: PLC0415

    for module in ("ipip", "ip6_tunnel"):
        with contextlib.suppress(OSError):
            subprocess.run(["modprobe", "-q", module], capture_output=True)
    ns = f"{PREFIX}-{_next_tag()}-probe"
    netns.create(ns)
    try:
        with Node("probe", ns) as node:
            for kind, name in (("ipip", "probe4"), ("ip6tnl", "probe6")):
                try:
                    node.ipr.link("add", ifname=name, kind=kind)
                except NetlinkError as e:
                    _ipip_support = (False, f"this kernel has no {kind} device (creating one fails: "
                                            f"{e.args[1]}; CONFIG_NET_IPIP / CONFIG_IPV6_TUNNEL off)")
                    break
            else:
                _ipip_support = (True, "")
    finally:
        _remove_ns(ns)
    return _ipip_support


def resolve_decap(mode: str) -> str:
    if mode not in DECAP_MODES:
        raise TestbedError(f"--decap {mode!r}: use one of {', '.join(DECAP_MODES)}")
    if mode == "auto":
        return "ipip" if ipip_support()[0] else "xdp"
    if mode == "ipip":
        ok, why = ipip_support()
        if not ok:
            raise TestbedError(f"--decap ipip: {why}")
    return mode


# Compiling the decap program takes ~2 s; a process that builds several
# testbeds reuses the loaded programs (they detach when a namespace goes).
_decap_pool: list = []
_pool_lock = threading.Lock()


def _take_decap():
    with _pool_lock:
        prog = _decap_pool.pop() if _decap_pool else None
    if prog is None:
        from . import bpf  # noqa: PLC0415

        prog = bpf.load_decap()
    from . import consts  # noqa: PLC0415

    prog.table(consts.MAP_DECAP_ADDRS).clear()
    prog.ifname = prog.attach_mode = None
    return prog


def _give_back(prog) -> None:
    with _pool_lock:
        _decap_pool.append(prog)


def _addr_key(table, address: str):
    """struct addr_key: the address as four words in raw network order, and its family."""
    from . import consts  # noqa: PLC0415

    ip = ipaddress.ip_address(address)
    k = table.Key()
    packed = ip.packed.ljust(16, b"\0")
    for i in range(4):
        k.addr[i] = int.from_bytes(packed[4 * i:4 * i + 4], "little")
    k.family = consts.FAMILY_V4 if ip.version == 4 else consts.FAMILY_V6
    return k


# ---- the testbed ------------------------------------------------------------------------------

@dataclass
class Options:
    decap: str = "auto"
    clients: int = 2
    backends: int = 3
    vips: int = 16  # VIP addresses per family on every backend's loopback
    lb_args: list[str] = field(default_factory=lambda: [
        "--max-vips", "32", "--max-backends", "64", "--ct-size", "65536"])


class Testbed:
    """The topology in the module docstring, built on __enter__ and removed on
    __exit__ (also when building fails half-way)."""

    __test__ = False

    def __init__(self, decap: str = "auto", clients: int = 2, backends: int = 3, vips: int = 16,
                 progress: Callable[[str], None] | None = None, lb_args: list[str] | None = None):
        if clients < 1 or not 1 <= backends <= 200 or not 1 <= vips <= 200:
            raise TestbedError("a testbed needs 1+ clients, 1-200 backends and 1-200 VIPs")
        self.opts = Options(decap, clients, backends, vips)
        if lb_args is not None:
            self.opts.lb_args = list(lb_args)
        self.say = progress or (lambda msg: log.info("%s", msg))
        self.tag = _next_tag()
        self.decap = ""
        self.nodes: list[Node] = []
        self.clients: list[Client] = []
        self.backends: list[Backend] = []
        self.router: Node | None = None
        self.lb: Lb | None = None
        self.router_program = None
        self.gateway_mac = ""
        self.workdir: Path | None = None
        self.build_seconds = 0.0
        self._nodes = contextlib.ExitStack()  # each Node: its thread and its one netlink socket

    # -- addresses
    def vip4(self, i: int = 0) -> str:
        return f"{NET4['vips']}.{10 + i}"

    def vip6(self, i: int = 0) -> str:
        return f"{NET6['vips']}::{10 + i}"

    def backend(self, name: str) -> Backend:
        for b in self.backends:
            if b.role == name:
                return b
        raise KeyError(name)

    def backend_by_address(self, address: str) -> Backend:
        a = str(ipaddress.ip_address(address))
        for b in self.backends:
            if a in (b.addr4, str(ipaddress.ip_address(b.addr6))):
                return b
        raise KeyError(address)

    def ns_name(self, role: str) -> str:
        return f"{PREFIX}-{self.tag}-{role}"

    # -- lifetime
    def __enter__(self) -> "Testbed":
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def build(self) -> None:
        t0 = time.monotonic()
        sweep(self.say)
        self.decap = resolve_decap(self.opts.decap)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-{self.tag}-"))
        self.say(f"namespaces {self.ns_name('*')} (decapsulation: {self.decap})")
        from pyroute2 import netns  # noqa: PLC0415

        roles = ["router", "lb"] + [f"c{i + 1}" for i in range(self.opts.clients)] + \
            [f"b{i + 1}" for i in range(self.opts.backends)]
        for role in roles:
            # a namespace with this exact name can only be left over by an earlier
            # process that had this pid (the sweep took it for alive: it is us)
            _remove_ns(self.ns_name(role))
            netns.create(self.ns_name(role))
            if role == "router":
                self.router = Node(role, self.ns_name(role))
                node = self.router
            elif role == "lb":
                self.lb = Lb(role, self.ns_name(role), f"{PREFIX}{self.tag}", self.workdir)
                self.lb.run_args = list(self.opts.lb_args)
                node = self.lb
            elif role.startswith("c"):
                node = Client(role, self.ns_name(role), int(role[1:]))
                self.clients.append(node)
            else:
                node = Backend(role, self.ns_name(role), int(role[1:]))
                self.backends.append(node)
            self.nodes.append(self._nodes.enter_context(node))
        self._sysctls()

        # the LB first: `l4lb run` compiles the balancer (seconds) while the rest is built
        self.say("LB link and `l4lb run`")
        self._lb_link()
        self.lb.start(with_config=True)

        self.say("bridges, clients, backends")
        self._bridges()
        for c in self.clients:
            self._client(c)
        for b in self.backends:
            self._backend(b)
        self.say("backend servers")
        for b in self.backends:
            self._start_server(b)
        self.say(f"decapsulation on {len(self.backends)} backends ({self.decap})")
        for b in self.backends:
            self._decap(b)
        self.say("XDP on the router's end of the LB link (makes XDP_TX from the LB deliverable)")
        self.router_program = _take_decap()
        self.router.run(self.router_program.attach, "lb", "native")

        self._wait_links()
        for b in self.backends:
            self._wait_server(b)
        self._wait_routes()
        self.say("waiting for `l4lb run` to serve gRPC")
        self.lb.wait_healthy()
        from . import consts  # noqa: PLC0415

        prog = self.lb.program()
        if not prog or prog[1] != consts.PROG_BALANCER:
            raise TestbedError(f"the LB's interface runs {prog}, not the balancer")
        for b in self.backends:
            b._base = b._decap_raw()
        self.build_seconds = time.monotonic() - t0
        self.say(f"testbed ready in {self.build_seconds:.1f} s")

    def close(self) -> None:
        """Stops the servers and `l4lb run` by pid, deletes the namespaces (their
        veths, and so the XDP attachments, go with them), the pinned maps and
        the temp dir. Every step runs even if an earlier one fails."""
        problems = []

        def step(what, fn, *args):
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001  teardown must go on
                problems.append(f"{what}: {e}")

        for b in self.backends:
            if b.server:
                step(f"stop server of {b.role}", _stop_popen, b.server)
        if self.lb and self.lb.proc:
            step("stop l4lb run", self.lb.stop)
        for n in self.nodes:
            # anything else still in our namespaces was started by this testbed
            step(f"processes in {n.ns}", _stop_pids, _ns_pids(n.ns))
        step("close the namespaces' sockets and threads", self._nodes.close)
        for n in self.nodes:
            step(f"delete {n.ns}", _remove_ns, n.ns)
        self.nodes = []
        if self.lb:
            step("remove pinned maps", bpf.remove_pins, str(self.lb.pin_dir))
        if self.workdir:
            step("remove temp dir", shutil.rmtree, self.workdir, True)
            self.workdir = None
        for prog in [b.program for b in self.backends if b.program] + [self.router_program]:
            if prog is not None:
                _give_back(prog)
        for b in self.backends:
            b.program = None
        self.router_program = None
        if problems:
            log.warning("testbed teardown: %s", "; ".join(problems))

    # -- building blocks
    def _sysctls(self) -> None:
        common = {"net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0,
                  "net.ipv6.conf.all.accept_ra": 0, "net.ipv6.conf.default.accept_ra": 0}
        no_rpf = {"net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0}
        hosts = {"net.ipv4.ip_forward": 0, "net.ipv6.conf.all.forwarding": 0}
        for n in self.nodes:
            if n is self.router:
                n.sysctl({**common, **no_rpf, "net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1})
            elif isinstance(n, Backend):
                n.sysctl({**common, **no_rpf, **hosts,
                          "net.ipv4.conf.all.arp_ignore": 1, "net.ipv4.conf.all.arp_announce": 2})
            else:
                n.sysctl({**common, **hosts})

    def _veth(self, node: Node, ifname: str, peer: Node, peer_ifname: str) -> None:
        """A veth pair with 2 queues a side: node's end ifname, peer's end peer_ifname."""
        fd = os.open(NETNS_DIR / peer.ns, os.O_RDONLY)
        try:
            node.ipr.link("add", ifname=ifname, kind="veth", num_tx_queues=2, num_rx_queues=2, mtu=MTU,
                          peer={"ifname": peer_ifname, "net_ns_fd": fd, "num_tx_queues": 2,
                                "num_rx_queues": 2, "mtu": MTU})
        finally:
            os.close(fd)

    @staticmethod
    def _addrs(node: Node, ifname: str, addrs: list[tuple[str, int]]) -> None:
        idx = node.index(ifname)
        for a, plen in addrs:
            node.ipr.addr("add", index=idx, address=a, prefixlen=plen)
        node.ipr.link("set", index=idx, state="up")

    @staticmethod
    def _routes(node: Node, routes: list[tuple[str, str]]) -> None:
        for dst, gw in routes:
            fam = socket.AF_INET6 if ":" in gw else socket.AF_INET
            node.ipr.route("add", dst=dst, gateway=gw, family=fam)

    def _lb_link(self) -> None:
        r, lb = self.router, self.lb
        self._veth(r, "lb", lb, lb.ifname)
        self._addrs(r, "lb", [(f"{NET4['lb']}.1", 24), (f"{NET6['lb']}::1", 64)])
        self._addrs(lb, lb.ifname, [(lb.addr4, 24), (lb.addr6, 64)])
        self._addrs(lb, "lo", [])
        self._routes(lb, [("0.0.0.0/0", f"{NET4['lb']}.1"), ("::/0", f"{NET6['lb']}::1")])
        self._routes(r, [(VIP_NET4, lb.addr4), (VIP_NET6, lb.addr6),
                         (ENCAP_NET4, lb.addr4), (ENCAP_NET6, lb.addr6)])
        self.gateway_mac = r.ipr.link("get", index=r.index("lb"))[0].get_attr("IFLA_ADDRESS")
        lb.config.write_text(
            "# written by l4lb.testbed: the router is the gateway\n"
            f'gateway_mac: "{self.gateway_mac}"\n'
            f'encap_source: {{ipv4: {ENCAP_NET4}, ipv6: "{ENCAP_NET6}"}}\n'
            f"mtu: {MTU}\n")

    def _bridges(self) -> None:
        r = self.router
        for br, net in (("brc", "clients"), ("brb", "backends")):
            r.ipr.link("add", ifname=br, kind="bridge", br_stp_state=0, br_forward_delay=0,
                       br_mcast_snooping=0)
            self._addrs(r, br, [(f"{NET4[net]}.{ROUTER_HOST}", 24), (f"{NET6[net]}::{ROUTER_HOST:x}", 64)])
        self._addrs(r, "lo", [])

    def _attach_port(self, port: str, bridge: str) -> None:
        r = self.router
        r.ipr.link("set", index=r.index(port), master=r.index(bridge), state="up")

    def _client(self, c: Client) -> None:
        self._veth(self.router, c.role, c, "eth0")
        self._attach_port(c.role, "brc")
        self._addrs(c, "eth0", [(c.addr4, 24), (c.addr6, 64)])
        self._addrs(c, "lo", [])
        self._routes(c, [("0.0.0.0/0", f"{NET4['clients']}.{ROUTER_HOST}"),
                         ("::/0", f"{NET6['clients']}::{ROUTER_HOST:x}")])
        r = subprocess.run(c.nsenter() + ["ethtool", "-K", "eth0", "tx", "off"], capture_output=True, text=True)
        if r.returncode:
            raise TestbedError(f"ethtool -K eth0 tx off in {c.ns}: {r.stderr.strip()}")

    def vips(self) -> list[str]:
        return [self.vip4(i) for i in range(self.opts.vips)] + [self.vip6(i) for i in range(self.opts.vips)]

    def _backend(self, b: Backend) -> None:
        self._veth(self.router, b.role, b, "eth0")
        self._attach_port(b.role, "brb")
        self._addrs(b, "eth0", [(b.addr4, 24), (b.addr6, 64)])
        self._addrs(b, "lo", [(a, 32 if "." in a else 128) for a in self.vips()])
        self._routes(b, [("0.0.0.0/0", f"{NET4['backends']}.{ROUTER_HOST}"),
                         ("::/0", f"{NET6['backends']}::{ROUTER_HOST:x}")])
        b.sysctl({"net.ipv4.conf.eth0.rp_filter": 0, "net.ipv4.conf.lo.rp_filter": 0})

    def _decap(self, b: Backend) -> None:
        from . import consts  # noqa: PLC0415

        b.decap = self.decap
        if self.decap == "xdp":
            b.program = _take_decap()
            t = b.program.table(consts.MAP_DECAP_ADDRS)
            for a in (b.addr4, b.addr6):
                t[_addr_key(t, a)] = t.Leaf(1)
            b.run(b.program.attach, "eth0", "native")
            return
        # ipip: 4in4 lands on an ipip device, 6in6 and 4in6 on an ip6tnl device in
        # mode any (IFLA_IP6TNL_PROTO 0), each bound to this backend's address
        b.ipr.link("add", ifname=TUNNEL4, kind="ipip", ipip_local=b.addr4)
        b.ipr.link("add", ifname=TUNNEL6, kind="ip6tnl", ip6tnl_local=b.addr6, ip6tnl_proto=0)
        for dev in (TUNNEL4, TUNNEL6):
            b.ipr.link("set", index=b.index(dev), state="up")
            b.sysctl({f"net.ipv4.conf.{dev}.rp_filter": 0})

    def _start_server(self, b: Backend) -> None:
        cmd = b.nsenter() + [sys.executable, "-m", "l4lb.testbed", "serve", "--name", b.role,
                             "--port", str(SERVICE_PORT), *self.vips()]
        with open(self.workdir / f"{b.role}.log", "w") as err:
            b.server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                        cwd=str(Path(__file__).resolve().parent.parent))

    def _wait_server(self, b: Backend) -> None:
        deadline = time.monotonic() + TIMEOUT
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            r, _, _ = select.select([b.server.stdout], [], [], max(left, 0))
            if not r:
                raise TestbedError(f"the server in {b.ns} did not start within {TIMEOUT:.0f} s")
            chunk = os.read(b.server.stdout.fileno(), 256)
            if not chunk:
                err = (self.workdir / f"{b.role}.log").read_text(errors="replace")
                raise TestbedError(f"the server in {b.ns} exited: {err.strip()[-2000:]}")
            line += chunk
        if not line.startswith(b"ready"):
            raise TestbedError(f"the server in {b.ns} said {line!r}")

    def _wait_links(self) -> None:
        """Polls until every veth and bridge is operationally up."""
        want = {self.router: ["lb", "brc", "brb"] + [n.role for n in self.clients + self.backends],
                self.lb: [self.lb.ifname]}
        for n in self.clients + self.backends:
            want[n] = ["eth0"]
        deadline = time.monotonic() + TIMEOUT
        for node, names in want.items():
            for name in names:
                while True:
                    state = node.ipr.link("get", index=node.index(name))[0].get_attr("IFLA_OPERSTATE")
                    if state == "UP":
                        break
                    if time.monotonic() > deadline:
                        raise TestbedError(f"{node.role}: {name} is {state}, not UP, after {TIMEOUT:.0f} s")
                    time.sleep(0.02)

    def _wait_routes(self) -> None:
        """Polls until each client reaches each backend's own addresses (not a
        VIP: the LB is not involved) over IPv4 and IPv6: routing, neighbours
        and the servers all work."""
        deadline = time.monotonic() + TIMEOUT
        for c in self.clients:
            for b in self.backends:
                for a in (b.addr4, b.addr6):
                    while True:
                        try:
                            conn = c.connect(a, timeout=1.0)
                            try:
                                name = conn.ask("ready?")
                            finally:
                                conn.close()
                            if name != b.role:
                                raise TestbedError(f"{a} answered as {name}, expected {b.role}")
                            break
                        except TestbedError:
                            if time.monotonic() > deadline:
                                raise
                            time.sleep(0.05)

    # -- helpers for tests and the demo
    def decap_totals(self) -> dict[str, int]:
        tot = {"decap4": 0, "decap6": 0}
        for b in self.backends:
            for k, v in b.decap_counts().items():
                tot[k] += v
        return tot

    def client_segments(self) -> int:
        """TCP segments the clients have sent, retransmissions included."""
        total = 0
        for c in self.clients:
            s = c.snmp()
            total += s["Tcp.OutSegs"] + s["Tcp.RetransSegs"]
        return total

    def csum_errors(self) -> dict[str, int]:
        """Checksum errors counted by each backend's stack (TCP, UDP, UDP6)."""
        out = {}
        for b in self.backends:
            s = b.snmp()
            out[b.role] = s["Tcp.InCsumErrors"] + s["Udp.InCsumErrors"] + s.get("Udp6InCsumErrors", 0)
        return out


def _stop_popen(p: subprocess.Popen, timeout: float = 5.0) -> None:
    if p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def wait_until(cond: Callable[[], object], timeout: float, what: str, interval: float = 0.02):
    """Polls cond() until it returns something true; returns it, or raises with `what`."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TestbedError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


# ---- the backends' server ---------------------------------------------------------------------

def serve(name: str, port: int, udp_addresses: list[str]) -> None:
    """Answers every line on a TCP connection with '<name> <line>', and every
    UDP datagram with '<name> <datagram>'. TCP listens on every address (a
    connection's replies leave from the address it came to, the VIP); UDP
    binds each VIP address, so that replies leave from the VIP (DSR)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(name.encode() + b" " + line)
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, addr):
            self.transport.sendto(name.encode() + b" " + data, addr)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(s, stop.set)
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::", port))
        server = await asyncio.start_server(handle, sock=sock, backlog=1024, limit=1 << 20)
        for a in udp_addresses:
            await loop.create_datagram_endpoint(Echo, local_addr=(a, port))
        print("ready", flush=True)
        await stop.wait()
        server.close()

    asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m l4lb.testbed",
                                description="the testbed's backend server, and leftover removal")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="answer TCP lines and UDP datagrams with this name")
    s.add_argument("--name", required=True)
    s.add_argument("--port", type=int, default=SERVICE_PORT)
    s.add_argument("udp_addresses", nargs="*", help="addresses to bind for UDP (the VIPs)")
    sub.add_parser("sweep", help="remove what interrupted testbeds left behind")
    args = p.parse_args(argv)
    if args.cmd == "serve":
        serve(args.name, args.port, args.udp_addresses)
    else:
        for what in sweep() or ["nothing to remove"]:
            print(what)
    return 0


if __name__ == "__main__":
    sys.exit(main())
