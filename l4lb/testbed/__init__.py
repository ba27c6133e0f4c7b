"""Network namespaces with real TCP and UDP through the load balancer, for the
end-to-end tests, `l4lb demo` and the benchmarks. Not part of the runtime:
nothing under l4lb/ but this package imports it.

This module is the one public entry; callers import from `l4lb.testbed`
only. The parts, by job:

    common.py      the error type, the address plan, ports, polling
    namespaces.py  namespace names, Node (a thread inside a namespace), the sweep of leftovers
    hosts.py       Client (Conn, UdpFlow, ping) and Backend
    tunnels.py     how backends decapsulate: ipip/ip6tnl devices or the XDP decap program
    lbproc.py      the LB node running `l4lb run`
    server.py      the backends' echo server (`python -m l4lb.testbed serve`)
    packets.py     the RFC 1071 checksum, the source address of a frame
    fibnet.py      FibNet: one namespace of routes and neighbours for next_hop fib's fixtures
    topology.py    Testbed: links, bridges, routes and sysctls, built and torn down
    fleet.py       Fleet: N LB nodes behind a BIRD router (BGP, BFD, ECMP)
    traffic.py     Traffic: long-lived TCP and numbered UDP streams while nodes come and go
"""
from .fibnet import FibNet
from .fleet import Bird, Fleet
from .common import MTU, SERVICE_PORT, TestbedError, wait_until
from .hosts import Backend, Client, Conn, UdpFlow
from .lbproc import Lb, LbLauncher
from .namespaces import Node, alive, sweep
from .packets import inet_checksum, ip_source
from .topology import Options, Testbed
from .traffic import Traffic
from .tunnels import DECAP_MODES, backend_commands, fou_support, ipip_support

__all__ = ["Bird", "DECAP_MODES", "FibNet", "Fleet", "alive", "backend_commands", "MTU", "SERVICE_PORT", "Backend", "Client", "Conn", "Lb",
           "LbLauncher", "Node", "Options", "Testbed", "TestbedError", "Traffic", "UdpFlow", "inet_checksum", "ip_source",
           "fou_support", "ipip_support", "sweep",
           "wait_until"]
