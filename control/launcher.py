"""How the layers around the control plane start `l4lb` and tell that it
serves. The testbed (l4lb.testbed) knows nothing of the control plane: the
demo, the end-to-end tests and the traffic benchmark hand it launcher()."""
from __future__ import annotations

import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .client import channel


class Launcher:
    """`l4lb` of this Python environment: the script installed beside the
    interpreter, else the package run as `python -m control.cli`; ready when
    the gRPC health service says SERVING."""

    def command(self, args: list[str]) -> list[str]:
        exe = Path(sys.executable).with_name("l4lb")
        return ([str(exe)] if exe.exists() else [sys.executable, "-m", "control.cli"]) + list(args)

    def ready(self, grpc_address: str, timeout: float = 1.0) -> bool:
        try:
            with channel(grpc_address) as ch:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
        return r.status == health_pb2.HealthCheckResponse.SERVING


def launcher() -> Launcher:
    return Launcher()
