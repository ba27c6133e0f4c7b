"""The LB node of the testbed: a real `l4lb run` in the LB namespace (a
subprocess entered into it with nsenter, so that it sees the BPF filesystem),
attached natively to its veth, its gRPC API on a unix socket in the
testbed's temp dir. Starting, waiting until it serves, stopping, restarting
(it adopts the pinned maps), the attached program, and a capture of what its
stack sees.

The testbed knows no control plane: its caller hands it an LbLauncher, which
says how to run `l4lb` and how to tell that it serves."""
from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Protocol

from .. import netlink
from .common import NET4, NET6, PIN_ROOT, TestbedError
from .namespaces import Node


class LbLauncher(Protocol):
    """What the testbed needs of the control plane, from its caller."""

    def command(self, args: list[str]) -> list[str]:
        """The command line that runs `l4lb <args>`."""

    def ready(self, grpc_address: str) -> bool:
        """Whether the process listening on grpc_address serves; False (never an
        exception) while it does not, and within a second or so."""


class Lb(Node):
    def __init__(self, role: str, ns: str, ifname: str, workdir: Path, launcher: LbLauncher):
        super().__init__(role, ns)
        self.launcher = launcher
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
        args = ["run", "--interface", self.ifname, "--listen", self.grpc_address,
                "--state-dir", str(self.state_dir), "--attach-mode", "native", *self.run_args]
        return self.launcher.command(args + (["--config", str(self.config)] if with_config else []))

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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TestbedError(f"l4lb run exited with status {self.proc.returncode}:\n{self.log_tail()}")
            if self.socket_path.exists() and self.launcher.ready(self.grpc_address):
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
