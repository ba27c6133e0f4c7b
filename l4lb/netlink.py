"""pyroute2 for the control plane: interface facts, neighbour resolution, XDP attach."""
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


XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_REPLACE = 1 << 4
MODE_FLAGS = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}


def _prog_fd_by_id(prog_id: int) -> int:
    import ctypes  # noqa: PLC0415

    from . import testrun  # noqa: PLC0415

    lib = testrun._lib()
    lib.bpf_prog_get_fd_by_id.argtypes = [ctypes.c_uint32]
    fd = lib.bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        raise BpfError(f"XDP program id {prog_id} vanished while being replaced")
    return fd


class _XdpAttachOpts(__import__("ctypes").Structure):
    import ctypes as _c

    _fields_ = [("sz", _c.c_size_t), ("old_prog_fd", _c.c_int)]


def xdp_attach(ifname: str, fd: int, mode: str, replace_id: int | None = None) -> None:
    """Attaches program fd to ifname. With replace_id, the kernel swaps the
    running program for the new one in one step, and only if the running one
    is still replace_id (XDP_FLAGS_REPLACE): no gap, no detach.

    This goes through libbpf's bpf_xdp_attach: pyroute2 0.7 encodes
    IFLA_XDP_FLAGS as 16 bits, which the kernel rejects (ERANGE)."""
    import ctypes  # noqa: PLC0415
    import os  # noqa: PLC0415

    from . import testrun  # noqa: PLC0415

    lib = testrun._lib()
    lib.bpf_xdp_attach.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_uint32, ctypes.POINTER(_XdpAttachOpts)]
    flags = MODE_FLAGS[mode]
    opts = _XdpAttachOpts(sz=ctypes.sizeof(_XdpAttachOpts), old_prog_fd=0)
    old_fd = None
    if replace_id:
        old_fd = _prog_fd_by_id(replace_id)
        flags |= XDP_FLAGS_REPLACE
        opts.old_prog_fd = old_fd
    else:
        flags |= XDP_FLAGS_UPDATE_IF_NOEXIST
    try:
        err = lib.bpf_xdp_attach(ifindex(ifname), fd, flags, ctypes.byref(opts))
    finally:
        if old_fd is not None:
            os.close(old_fd)
    if err:
        raise BpfError(f"cannot attach XDP ({mode}) to {ifname}: {os.strerror(-err)} (errno {-err})")


def xdp_detach(ifname: str, mode: str) -> None:
    import ctypes  # noqa: PLC0415
    import os  # noqa: PLC0415

    from . import testrun  # noqa: PLC0415

    lib = testrun._lib()
    lib.bpf_xdp_detach.argtypes = [ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p]
    err = lib.bpf_xdp_detach(ifindex(ifname), MODE_FLAGS[mode], None)
    if err:
        raise BpfError(f"cannot detach XDP from {ifname}: {os.strerror(-err)}")
