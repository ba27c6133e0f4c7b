"""What every part of the testbed shares: its error type, the address plan of
its namespaces (all inside 198.18.0.0/15 and fd00:198:18::/48), the ports and
limits, and small helpers for addresses and waiting."""
from __future__ import annotations

import ipaddress
import socket
import time
from pathlib import Path
from typing import Callable

from .. import consts
from ..errors import L4lbError

PREFIX = "l4lbtb"
NETNS_DIR = Path("/run/netns")
PIN_ROOT = Path(consts.PIN_ROOT)
SERVICE_PORT = 80  # TCP and UDP port of the backends' servers (and so of the VIPs)

NET4 = {"clients": "198.18.0", "lb": "198.18.1", "backends": "198.18.2", "vips": "198.18.10"}
NET6 = {"clients": "fd00:198:18:0", "lb": "fd00:198:18:1", "backends": "fd00:198:18:2", "vips": "fd00:198:18:10"}
VIP_NET4, VIP_NET6 = "198.18.10.0/24", "fd00:198:18:10::/64"
ENCAP_NET4, ENCAP_NET6 = consts.DEFAULT_ENCAP_V4, consts.DEFAULT_ENCAP_V6
ROUTER_HOST = 254  # the router's host number on the client and backend bridges
MTU = 1500
TIMEOUT = 20.0  # seconds any one readiness wait may take


class TestbedError(L4lbError):
    """The testbed could not be built or a step of traffic failed; the message says which."""

    __test__ = False  # not a pytest test class


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def family(address: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


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
