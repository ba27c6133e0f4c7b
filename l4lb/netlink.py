"""The only pyroute2 importer: interface facts, the attached XDP program,
neighbour resolution. (Attaching XDP goes through l4lb.libbpf.)"""
from __future__ import annotations

import json
import subprocess

from pyroute2 import IPRoute

from .errors import BpfError, ValidationError
from .model import parse_address


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


def require_bpftool() -> None:
    try:
        subprocess.run(["bpftool", "version"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise BpfError("bpftool is missing: run `make setup`") from e
