"""How the testbed's backends decapsulate the LB's IP-in-IP and GUE packets:
with the kernel's ipip and ip6tnl devices (and fou ports for GUE) where this
kernel can make them, otherwise with the XDP decap program (xdp/decap.c). The
probes for tunnel devices and fou, the choice of mode, the set-up on one
backend, and a pool of loaded decap programs.

The router's end of the LB link gets a decap program too, with no addresses,
which passes every frame: see topology.py for why."""
from __future__ import annotations

import contextlib
import subprocess
import threading

from .. import consts, decap
from .common import PREFIX, TestbedError
from .namespaces import Node, create_ns, next_tag, remove_ns

DECAP_MODES = ("auto", "xdp", "ipip")
TUNNEL4, TUNNEL6 = "l4lbip4", "l4lbip6"

_ipip_support: tuple[bool, str] | None = None
_fou_support: tuple[bool, str] | None = None


def ipip_support() -> tuple[bool, str]:
    """(True, '') when this kernel can make ipip and ip6tnl devices, else (False, why).
    Loads the modules if they exist, then tries both devices in a scratch namespace."""
    global _ipip_support
    if _ipip_support is not None:
        return _ipip_support
    from pyroute2.netlink.exceptions import NetlinkError  # noqa: PLC0415

    for module in ("ipip", "ip6_tunnel"):
        with contextlib.suppress(OSError):
            subprocess.run(["modprobe", "-q", module], capture_output=True)
    ns = f"{PREFIX}-{next_tag()}-probe"
    create_ns(ns)
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
        remove_ns(ns)
    return _ipip_support


def fou_support() -> tuple[bool, str]:
    """(True, '') when this kernel can receive GUE on a fou port (CONFIG_NET_FOU),
    else (False, why). Tries `ip fou add` in a scratch namespace."""
    global _fou_support
    if _fou_support is not None:
        return _fou_support
    with contextlib.suppress(OSError):
        subprocess.run(["modprobe", "-q", "fou"], capture_output=True)
    ns = f"{PREFIX}-{next_tag()}-fou"
    create_ns(ns)
    try:
        r = subprocess.run(["ip", "-n", ns, "fou", "add", "port", str(consts.DEFAULT_GUE_PORT), "gue"],
                           capture_output=True, text=True)
        _fou_support = (True, "") if r.returncode == 0 else (
            False, f"this kernel has no fou (ip fou add: {r.stderr.strip() or r.returncode}; CONFIG_NET_FOU off)")
    finally:
        remove_ns(ns)
    return _fou_support


def fou_commands(gue_port: int = consts.DEFAULT_GUE_PORT) -> list[str]:
    """GUE on top of the ipip/ip6tnl devices: a fou port per family, in GUE mode
    (the version nibble after the UDP header sends the packet on as IPv4-in-IP or
    IPv6-in-IP, which the devices then take)."""
    return [f"ip fou add port {gue_port} gue", f"ip -6 fou add port {gue_port} gue"]


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


def decapsulate(b, mode: str) -> None:
    """Sets up decapsulation on backend b (a hosts.Backend) in mode 'xdp' or 'ipip'."""
    b.decap = mode
    if mode == "xdp":
        b.program = take_decap()
        decap.set_endpoints(b.program, (b.addr4, b.addr6))
        b.run(b.program.attach, "eth0", "native")
        return
    # ipip: 4in4 lands on an ipip device, 6in6 and 4in6 on an ip6tnl device in
    # mode any (IFLA_IP6TNL_PROTO 0), each bound to this backend's address
    b.ipr.link("add", ifname=TUNNEL4, kind="ipip", ipip_local=b.addr4)
    b.ipr.link("add", ifname=TUNNEL6, kind="ip6tnl", ip6tnl_local=b.addr6, ip6tnl_proto=0)
    for dev in (TUNNEL4, TUNNEL6):
        b.ipr.link("set", index=b.index(dev), state="up")
        b.sysctl({f"net.ipv4.conf.{dev}.rp_filter": 0})
    if fou_support()[0]:
        for cmd in fou_commands():
            subprocess.run([*b.nsenter(), *cmd.split()], check=True, capture_output=True)


def backend_commands(b, mode: str, vips: list[str]) -> list[str]:
    """What the testbed does to prepare backend b (through netlink), written as
    the shell commands an operator would type on a backend (docs/dsr-backend.md)."""
    cmds = [f"ip addr add {v}/{32 if '.' in v else 128} dev lo" for v in vips]
    cmds.append("sysctl -w net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.eth0.rp_filter=0 "
                "net.ipv4.conf.lo.rp_filter=0")
    if mode == "xdp":
        cmds.append("python3 -c 'from l4lb import decap; "
                    f"decap.load([\"{b.addr4}\", \"{b.addr6}\"]).attach(\"eth0\", \"native\")'  "
                    "# stays attached after python exits")
    else:
        cmds += [f"ip link add {TUNNEL4} type ipip local {b.addr4}",
                 f"ip link add {TUNNEL6} type ip6tnl local {b.addr6} mode any",
                 f"ip link set {TUNNEL4} up", f"ip link set {TUNNEL6} up",
                 f"sysctl -w net.ipv4.conf.{TUNNEL4}.rp_filter=0 net.ipv4.conf.{TUNNEL6}.rp_filter=0",
                 *(fou_commands() if fou_support()[0] else [])]
    return cmds


# Compiling the decap program takes ~2 s; a process that builds several
# testbeds reuses the loaded programs (they detach when a namespace goes).
_decap_pool: list = []
_pool_lock = threading.Lock()


def take_decap():
    with _pool_lock:
        prog = _decap_pool.pop() if _decap_pool else None
    if prog is None:
        prog = decap.load()
    else:
        decap.set_endpoints(prog, ())
    prog.ifname = prog.attach_mode = None
    return prog


def give_back(prog) -> None:
    with _pool_lock:
        _decap_pool.append(prog)

