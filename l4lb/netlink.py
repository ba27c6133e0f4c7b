"""The only pyroute2 importer: interface facts, the attached XDP program,
neighbour resolution, the probes' tc egress filter (clsact), and the host
routes that announce VIPs (l4lb/announce.py). (Attaching XDP goes through
l4lb.libbpf.)"""
from __future__ import annotations

import errno
import json
import ipaddress
import logging
import select
import socket
import subprocess
import threading

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import consts
from .errors import BpfError, ValidationError
from .model import parse_address

log = logging.getLogger("l4lb.netlink")
TC_EGRESS = 0xFFFFFFF3  # clsact's egress hook (ffff:fff3)
TC_INGRESS = 0xFFFFFFF2  # and its ingress hook (ffff:fff2)
_ETH_P_ALL = 0x0003


def ifindex(ifname: str) -> int:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise ValidationError(f"--interface {ifname!r}: no such interface in this network namespace")
    return idx[0]


def xdp_program(ifname: str) -> tuple[int, str, str] | None:
    """(program id, name, tag) of the XDP program attached to ifname, if any."""
    with IPRoute() as ipr:
        links = ipr.get_links(ifindex(ifname))
    xdp = links[0].get_attr("IFLA_XDP") if links else None
    prog_id = xdp.get_attr("IFLA_XDP_PROG_ID") if xdp else None
    if not prog_id:
        return None
    r = subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog_id)], capture_output=True, text=True)
    info = json.loads(r.stdout) if r.returncode == 0 and r.stdout else {}
    return prog_id, info.get("name", ""), info.get("tag", "")


def xdp_prog_id(ifname: str) -> int:
    """The id of the XDP program attached to ifname (0: none); no bpftool call."""
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        links = ipr.get_links(idx[0]) if idx else []
    xdp = links[0].get_attr("IFLA_XDP") if links else None
    return (xdp.get_attr("IFLA_XDP_PROG_ID") or 0) if xdp else 0


def resolve_mac(ifname: str, ip: str) -> str:
    """The MAC of a neighbour on ifname, from the kernel's neighbour table."""
    addr = str(parse_address(ip, "ip"))
    with IPRoute() as ipr:
        for n in ipr.get_neighbours(ifindex=ifindex(ifname), dst=addr):
            mac = n.get_attr("NDA_LLADDR")
            if mac and mac != "00:00:00:00:00:00":
                return mac
    raise ValidationError(f"ip: {addr} has no entry in the neighbour table of {ifname}; "
                          "ping it from the LB once, or give the gateway's MAC")


def forwarding_off(ifname: str) -> list[str]:
    """The sysctls that say no forwarding on ifname (IPv4; IPv6 where the
    kernel has it): bpf_fib_lookup answers "forwarding disabled" for a
    packet that came in on such an interface."""
    off = []
    for fam in ("ipv4", "ipv6"):
        path = f"/proc/sys/net/{fam}/conf/{ifname}/forwarding"
        try:
            with open(path) as f:
                if f.read().strip() == "0":
                    off.append(f"net.{fam}.conf.{ifname}.forwarding")
        except FileNotFoundError:
            continue
    return off


# rtnetlink multicast groups a route, rule, address, link, neighbour or forwarding change is
# told on (forwarding: the FIB answers XDP only for ingress interfaces that forward)
_RT_GROUPS = (1, 3, 5, 7, 8, 9, 11, 19, 24, 25, 32)  # LINK NEIGH IPV4_IFADDR IPV4_ROUTE IPV4_RULE
# IPV6_IFADDR IPV6_ROUTE IPV6_RULE IPV4_NETCONF IPV6_NETCONF NEXTHOP
_SOL_NETLINK, _NETLINK_ADD_MEMBERSHIP = 270, 1


class RouteWatch:
    """Calls on_change() (from a thread of its own) after the kernel tells of
    a change of routes, rules, addresses, links, neighbours or forwarding in
    this network namespace; what arrived together gives one call. stop() ends it."""

    def __init__(self, on_change, poll: float = 0.2):
        self.on_change, self.poll = on_change, poll
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        for g in _RT_GROUPS:
            try:
                self.sock.setsockopt(_SOL_NETLINK, _NETLINK_ADD_MEMBERSHIP, g)
            except OSError:
                pass  # a group this kernel does not have
        self.sock.setblocking(False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="l4lb-routewatch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], self.poll)
            if not ready:
                continue
            try:
                while self.sock.recv(65536):
                    pass
            except BlockingIOError:
                pass
            except OSError:
                return
            try:
                self.on_change()
            except Exception as e:  # noqa: BLE001  a failed call must not end the watch
                log.error("after a route or neighbour change: %s", e)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def require_bpftool() -> None:
    try:
        subprocess.run(["bpftool", "version"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise BpfError("bpftool is missing: run `make setup`") from e


def _has_clsact(ipr: IPRoute, index: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=index))


def _egress_filters(ipr: IPRoute, index: int) -> list:
    return [f for f in ipr.get_filters(index=index, parent=TC_EGRESS) if f.get_attr("TCA_KIND")]


def tc_attach_egress(ifname: str, prog_fd: int, name: str, replace: bool = False) -> bool:
    """Attaches a BPF classifier (direct action) to ifname's egress hook, at
    the probes' priority and handle (consts.PROBE_TC_PRIO/_HANDLE), adding a
    clsact qdisc if the interface has none. Returns whether it added the
    qdisc, which tc_detach_egress then removes."""
    index = ifindex(ifname)
    with IPRoute() as ipr:
        added = False
        if not _has_clsact(ipr, index):
            try:
                ipr.tc("add", "clsact", index)
            except NetlinkError as e:
                raise BpfError(f"cannot add a clsact qdisc to {ifname}: {e}") from e
            added = True
        try:
            ipr.tc("replace-filter" if replace else "add-filter", "bpf", index, handle=consts.PROBE_TC_HANDLE, fd=prog_fd, name=name,
                   parent=TC_EGRESS, prio=consts.PROBE_TC_PRIO, protocol=_ETH_P_ALL, direct_action=True)
        except NetlinkError as e:
            if added:
                ipr.tc("del", "clsact", index)
            hint = "; a probe filter is attached already" if e.code == errno.EEXIST else ""
            raise BpfError(f"cannot attach {name} to the egress of {ifname}: {e}{hint}") from e
    return added


def tc_detach_egress(ifname: str, remove_qdisc: bool) -> None:
    """Removes the probes' egress filter from ifname, and the clsact qdisc when
    remove_qdisc (tc_attach_egress added it) and no other filter uses it."""
    index = ifindex(ifname)
    with IPRoute() as ipr:
        try:
            ipr.tc("del-filter", "bpf", index, handle=consts.PROBE_TC_HANDLE, parent=TC_EGRESS,
                   prio=consts.PROBE_TC_PRIO, protocol=_ETH_P_ALL)
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.EINVAL):
                raise BpfError(f"cannot remove the probe filter from {ifname}: {e}") from e
        if remove_qdisc and _has_clsact(ipr, index) and not _egress_filters(ipr, index) \
                and not ipr.get_filters(index=index, parent=TC_INGRESS):
            ipr.tc("del", "clsact", index)


def tc_egress_filters(ifname: str) -> list[tuple[int, str]]:
    """(priority, name) of each BPF filter on ifname's egress hook; [] without clsact."""
    index = ifindex(ifname)
    with IPRoute() as ipr:
        if not _has_clsact(ipr, index):
            return []
        out = []
        for f in _egress_filters(ipr, index):
            opts = f.get_attr("TCA_OPTIONS")
            name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
            if name:
                out.append((f["info"] >> 16, name))
        return out


def has_clsact(ifname: str) -> bool:
    with IPRoute() as ipr:
        return _has_clsact(ipr, ifindex(ifname))


# ---- announcement routes -------------------------------------------------------------
# A VIP is announced by a host route (/32, /128) of type blackhole in a table of
# its own, tagged with a protocol number of its own: no rule points a lookup at
# that table, so the routes change nothing in this host's forwarding; a routing
# daemon (BIRD's kernel protocol with `learn`) imports them and exports them.

def _route_family(address: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(address)
    return (socket.AF_INET6, 128) if ip.version == 6 else (socket.AF_INET, 32)


def host_routes(table: int, proto: int) -> set[str]:
    """Destinations of the host routes of protocol `proto` in `table`."""
    out = set()
    with IPRoute() as ipr:
        for fam in (socket.AF_INET, socket.AF_INET6):
            try:
                routes = ipr.get_routes(family=fam, table=table)
            except NetlinkError as e:
                if e.code == errno.ENOENT:
                    continue
                raise BpfError(f"cannot read routing table {table}: {e}") from e
            for r in routes:
                if r["proto"] != proto or r["dst_len"] != (128 if fam == socket.AF_INET6 else 32):
                    continue
                if (r.get_attr("RTA_TABLE") or r["table"]) != table:
                    continue
                out.add(str(ipaddress.ip_address(r.get_attr("RTA_DST"))))
    return out


def set_host_routes(table: int, proto: int, add: list[str], remove: list[str]) -> None:
    """Adds (replace: idempotent) and removes host routes in `table`."""
    with IPRoute() as ipr:
        for a in add:
            fam, plen = _route_family(a)
            try:
                ipr.route("replace", dst=a, dst_len=plen, family=fam, table=table, proto=proto, type="blackhole")
            except NetlinkError as e:
                raise BpfError(f"cannot add the route {a}/{plen} to table {table}: {e}") from e
        for a in remove:
            fam, plen = _route_family(a)
            try:
                ipr.route("del", dst=a, dst_len=plen, family=fam, table=table, proto=proto, type="blackhole")
            except NetlinkError as e:
                if e.code not in (errno.ESRCH, errno.ENOENT):
                    raise BpfError(f"cannot remove the route {a}/{plen} from table {table}: {e}") from e
