"""docker/compose.yaml brought up for a test run: its own project name, image
tag, subnets and gRPC port, so that it never meets a stack a user runs; and
taken down whole (containers, networks, the images built for it)."""
from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import time
import uuid
from pathlib import Path

import dockerenv
from control.client import Client
from control.l4lb.v1 import l4lb_pb2 as pb
from dockerenv import DockerEnvError, Engine

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker" / "compose.yaml"
SERVICES = ("router", "lb", "backend-1", "backend-2", "backend-3", "client")
BACKENDS = {"backend-1": 21, "backend-2": 22, "backend-3": 23}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self, engine: Engine, workdir: Path, say=print):
        self.engine = engine
        self.workdir = workdir
        self.say = say
        self.id = uuid.uuid4().hex[:8]
        self.project = f"l4lbtest{self.id}"
        self.tag = f"test-{self.id}"
        self.port = _free_port()
        self.net = self.mgmt = ""
        self.containers: dict[str, str] = {}
        self.tls: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self.built = False

    # --- addresses -------------------------------------------------------------
    def addr(self, host: int) -> str:
        return f"{self.net}.{host}"

    def backend_addr(self, name: str) -> str:
        return self.addr(BACKENDS[name])

    def backend_name(self, address: str) -> str:
        return {self.backend_addr(n): n for n in BACKENDS}[address]

    @property
    def client_addr(self) -> str:
        return self.addr(31)

    def _pick_subnets(self) -> None:
        """Two /24s of 198.19.0.0/16 that no Docker network uses."""
        used = set()
        ids = self.engine.run("network", "ls", "-q").stdout.split()
        if ids:
            for net in json.loads(self.engine.run("network", "inspect", *ids).stdout):
                for cfg in (net.get("IPAM") or {}).get("Config") or []:
                    if cfg.get("Subnet"):
                        used.add(ipaddress.ip_network(cfg["Subnet"], strict=False))
        free = []
        for third in range(210, 250):
            cand = ipaddress.ip_network(f"198.19.{third}.0/24")
            if not any(cand.overlaps(u) for u in used):
                free.append(f"198.19.{third}")
        if len(free) < 2:
            raise DockerEnvError("no two free /24s in 198.19.210.0-198.19.249.0 for the test networks")
        self.net, self.mgmt = free[0], free[1]

    # --- compose -----------------------------------------------------------------
    def env(self) -> dict[str, str]:
        e = self.engine.env()
        e.update(L4LB_TAG=self.tag, L4LB_BUILD_ID=self.id, L4LB_NET=self.net, L4LB_MGMT_NET=self.mgmt,
                 L4LB_GRPC_PORT=str(self.port), COMPOSE_PROJECT_NAME=self.project)
        return e

    def compose(self, *args: str, timeout: float = 600, check: bool = True, log: str | None = None):
        cmd = [*self.engine.compose, "-p", self.project, "-f", str(COMPOSE_FILE), *args]
        if log:
            with open(self.workdir / log, "ab") as f:
                r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env(), timeout=timeout,
                                   stdin=subprocess.DEVNULL)
            if check and r.returncode:
                tail = (self.workdir / log).read_text(errors="replace").strip().splitlines()[-25:]
                raise AssertionError(f"{' '.join(args[:1])} failed ({self.workdir / log}):\n" + "\n".join(tail))
            return r
        r = subprocess.run(cmd, capture_output=True, text=True, env=self.env(), timeout=timeout,
                           stdin=subprocess.DEVNULL)
        if check and r.returncode:
            raise AssertionError(f"compose {' '.join(args)}: {(r.stderr or r.stdout).strip()[-2000:]}")
        return r

    def _timed(self, what: str, t0: float) -> None:
        self.timings[what] = time.monotonic() - t0
        self.say(f"{what}: {self.timings[what]:.1f} s")

    def base_image(self) -> None:
        t0 = time.monotonic()
        cas = dockerenv.stage_local_cas()
        how = dockerenv.ensure_base_image(self.engine)
        self._timed(f"base image {dockerenv.BASE_IMAGE} ({how}"
                    + (f"; extra CAs {', '.join(cas)}" if cas else "") + ")", t0)

    def up(self) -> None:
        self._pick_subnets()
        self.say(f"project {self.project}: networks {self.net}.0/24 (data), {self.mgmt}.0/24 (mgmt), "
                 f"gRPC on 127.0.0.1:{self.port}; logs in {self.workdir}")
        t0 = time.monotonic()
        self.built = True
        build = ["build"]
        if self.engine.compose[-1].endswith("docker-compose"):
            build.append("--force-rm")  # Compose 1.x: no intermediate containers left by a failed step
        self.compose(*build, timeout=900, log="build.log")
        self._timed("images built", t0)
        t0 = time.monotonic()
        self.compose("up", "-d", "--no-build", timeout=300, log="up.log")
        for svc in SERVICES:
            cid = self.compose("ps", "-q", svc).stdout.strip()
            assert cid, f"service {svc} has no container"
            self.containers[svc] = cid
        self._wait_serving()
        self._timed("topology up, LB serving", t0)

    def _wait_serving(self, wait: float = 240) -> None:
        deadline = time.monotonic() + wait
        tls_dir = self.workdir / "tls"
        tls_dir.mkdir(exist_ok=True)
        last = ""
        while time.monotonic() < deadline:
            state = self.engine.run("inspect", "-f", "{{.State.Status}}", self.containers["lb"],
                                    check=False).stdout.strip()
            if state != "running":
                raise AssertionError(f"the LB container is {state}:\n{self.logs('lb')}")
            try:
                for name in ("ca.pem", "client.pem", "client.key"):
                    r = self.engine.run("exec", self.containers["lb"], "cat", f"/etc/l4lb/tls/{name}", check=False)
                    if r.returncode or not r.stdout:
                        raise FileNotFoundError(name)
                    (tls_dir / name).write_text(r.stdout)
                self.tls = {"tls_ca": str(tls_dir / "ca.pem"), "cert": str(tls_dir / "client.pem"),
                            "key": str(tls_dir / "client.key")}
                with self.client(timeout=3) as c:
                    c.call("GetStatus", pb.GetStatusRequest())
                return
            except Exception as e:  # noqa: BLE001 (not there yet: keep waiting)
                last = str(e)
            time.sleep(1)
        raise AssertionError(f"the LB did not serve within {wait:.0f} s ({last}):\n{self.logs('lb')}")

    def client(self, timeout: float = 10.0) -> Client:
        return Client(f"127.0.0.1:{self.port}", timeout=timeout, **self.tls)

    def exec(self, svc: str, *cmd: str, timeout: float = 120, check: bool = True, **kw):
        r = subprocess.run([*self.engine.docker, "exec", self.containers[svc], *cmd], capture_output=True,
                           text=True, timeout=timeout, env=self.engine.env(), stdin=subprocess.DEVNULL, **kw)
        if check and r.returncode:
            raise AssertionError(f"{svc}: {' '.join(cmd)}: status {r.returncode}: {(r.stderr or r.stdout).strip()}")
        return r

    def popen(self, svc: str, *cmd: str) -> subprocess.Popen:
        return subprocess.Popen([*self.engine.docker, "exec", "-i", self.containers[svc], *cmd],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, env=self.engine.env())

    def logs(self, svc: str, tail: int = 40) -> str:
        cid = self.containers.get(svc)
        if not cid:
            return ""
        r = self.engine.run("logs", "--tail", str(tail), cid, check=False)
        return (r.stdout + r.stderr).strip()

    def down(self) -> None:
        """Containers, networks and the images built for this run; the base image stays."""
        t0 = time.monotonic()
        with open(self.workdir / "containers.log", "w") as f:
            for svc in self.containers:
                f.write(f"==> {svc}\n{self.logs(svc, tail=200)}\n")
        errors = []
        r = self.compose("down", "-v", "--remove-orphans", "--rmi", "all", "-t", "5", check=False, timeout=300,
                         log="down.log")
        if r.returncode:
            errors.append(f"compose down: status {r.returncode} ({self.workdir / 'down.log'})")
        # what `down --rmi` does not know: stages of multi-stage builds, images of a half-done build
        for ref in (f"l4lb/{n}:{self.tag}" for n in ("lb", "backend", "client", "router")):
            if dockerenv.image_exists(self.engine, ref):
                self.engine.run("rmi", "-f", ref, check=False, timeout=120)
        # children before parents: what has none left goes in each round
        for _ in range(10):
            left = self.engine.run("images", "-aq", "--filter", f"label=org.l4lb.build={self.id}",
                                   check=False).stdout.split()
            if not left:
                break
            for image in dict.fromkeys(left):
                self.engine.run("rmi", image, check=False, timeout=120)
        else:
            errors.append(f"images labelled org.l4lb.build={self.id} are left: {' '.join(left)}")
        nets = self.engine.run("network", "ls", "-q", "--filter", f"label=com.docker.compose.project={self.project}",
                               check=False).stdout.split()
        if nets:
            self.engine.run("network", "rm", *nets, check=False)
        self._timed("torn down", t0)
        if errors:
            raise AssertionError("; ".join(errors))
