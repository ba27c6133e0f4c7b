"""The LB container's main process: readies the node, then runs `l4lb run`
and keeps it running.

At start: kernel headers for bcc and bpffs (l4lb-node-prep); the data
interface (the one that routes to the gateway); the gateway's MAC from the
neighbour table; a CA, a server and a client certificate for mutual TLS (made
once per container, the CA key discarded); the start configuration (gateway
MAC and encapsulation source, plus the VIPs of L4LB_CONFIG if given).

Then `l4lb run` on the data interface. A first run in this container loads the
program and applies the start configuration; later runs (SIGHUP, or a crash)
adopt the pinned maps and the state instead, so VIPs made with the CLI stay.
SIGHUP restarts the control plane: the XDP program stays attached and traffic
keeps flowing while it is down. SIGTERM stops it and the container.

Environment: L4LB_GATEWAY_IP, L4LB_ENCAP_SOURCE and L4LB_LISTEN (HOST:PORT on
the management network) are required; L4LB_ATTACH_MODE (default generic),
L4LB_TLS_NAMES (more names and addresses for the server certificate),
L4LB_CONFIG (a YAML file with VIPs, README's format) and L4LB_RUN_ARGS (more
`l4lb run` options, e.g. --max-vips 16) are optional."""
from __future__ import annotations

import ipaddress
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from l4lb import consts

RUN_DIR = Path("/run/l4lb")
TLS_DIR = Path("/etc/l4lb/tls")
START_CONFIG = RUN_DIR / "start.yaml"
PIN_ROOT = Path(consts.PIN_ROOT)


def say(msg: str) -> None:
    print(f"l4lb-lb: {msg}", flush=True)


def fail(msg: str) -> None:
    print(f"l4lb-lb: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def need(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        fail(f"{name} is not set (docker/compose.yaml sets it)")
    return value


def ip_json(*args: str):
    r = subprocess.run(["ip", "-j", *args], capture_output=True, text=True)
    if r.returncode:
        fail(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return json.loads(r.stdout or "[]")


def data_interface(gateway: str) -> str:
    routes = ip_json("route", "get", gateway)
    if not routes or "dev" not in routes[0]:
        fail(f"no route to the gateway {gateway}")
    if "gateway" in routes[0]:
        fail(f"the gateway {gateway} is not on a network of this container")
    return routes[0]["dev"]


def gateway_mac(ifname: str, gateway: str, wait: float = 120) -> str:
    """Sends a datagram to the gateway so that the kernel resolves its MAC,
    then reads the neighbour table (the router may start after us)."""
    deadline = time.monotonic() + wait
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        while time.monotonic() < deadline:
            try:
                s.sendto(b"", (gateway, 9))
            except OSError:
                pass
            time.sleep(0.5)
            for n in ip_json("neigh", "show", gateway, "dev", ifname):
                mac = n.get("lladdr")
                if mac and n.get("state") and "FAILED" not in n["state"] and "INCOMPLETE" not in n["state"]:
                    return mac
    fail(f"the gateway {gateway} does not answer ARP on {ifname}")
    return ""


def openssl(*args: str) -> None:
    r = subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=TLS_DIR)
    if r.returncode:
        fail(f"openssl {args[0]}: {r.stderr.strip()}")


def make_tls(listen_host: str) -> None:
    """A CA, a server certificate for the management address, loopback and the
    names in L4LB_TLS_NAMES, and one client certificate; the CA key is
    discarded once both are signed."""
    if (TLS_DIR / "server.pem").exists():
        return
    TLS_DIR.mkdir(parents=True, exist_ok=True)
    os.chmod(TLS_DIR, 0o700)
    names = {listen_host, "127.0.0.1", "localhost", socket.gethostname()}
    names.update(n.strip() for n in os.environ.get("L4LB_TLS_NAMES", "").split(",") if n.strip())
    alt = []
    for n in sorted(names):
        try:
            alt.append(f"IP:{ipaddress.ip_address(n)}")
        except ValueError:
            alt.append(f"DNS:{n}")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "3650",
            "-subj", "/CN=l4lb container CA")
    for name, usage, extra in (("server", "serverAuth", f"subjectAltName={','.join(alt)}\n"),
                               ("client", "clientAuth", "")):
        (TLS_DIR / f"{name}.ext").write_text(f"extendedKeyUsage={usage}\n{extra}")
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=l4lb-{name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "3650", "-extfile", f"{name}.ext")
    for leftover in ("ca.key", "ca.srl", "server.csr", "client.csr", "server.ext", "client.ext"):
        (TLS_DIR / leftover).unlink(missing_ok=True)
    say(f"made a CA and certificates in {TLS_DIR} (server names: {', '.join(sorted(names))})")


def start_config(mac: str, encap: str) -> None:
    doc = {}
    user = os.environ.get("L4LB_CONFIG", "").strip()
    if user:
        if not Path(user).is_file():
            fail(f"L4LB_CONFIG={user}: no such file")
        doc = yaml.safe_load(Path(user).read_text()) or {}
        if not isinstance(doc, dict):
            fail(f"{user}: expected a mapping (README.md's configuration format)")
    doc.setdefault("gateway_mac", mac)
    doc.setdefault("encap_source", {})
    doc["encap_source"].setdefault("ipv4", encap)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    START_CONFIG.write_text(yaml.safe_dump(doc, sort_keys=False))


class Supervisor:
    def __init__(self, argv: list[str], pin_dir: Path):
        self.argv = argv
        self.pin_dir = pin_dir
        self.child: subprocess.Popen | None = None
        self.stopping = False
        self.restart = False

    def on_signal(self, signum, _frame) -> None:
        if signum == signal.SIGHUP:
            self.restart = True
        else:
            self.stopping = True
        if self.child and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def run(self) -> int:
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, self.on_signal)
        (RUN_DIR / "supervisor.pid").write_text(f"{os.getpid()}\n")
        backoff = 1.0
        while not self.stopping:
            argv = list(self.argv)
            if self.pin_dir.exists():
                say("starting l4lb run (adopting the pinned maps and state)")
            else:
                argv += ["--config", str(START_CONFIG)]
                say(f"starting l4lb run with {START_CONFIG}")
            started = time.monotonic()
            self.child = subprocess.Popen(argv)
            (RUN_DIR / "run.pid").write_text(f"{self.child.pid}\n")
            rc = self.child.wait()
            if self.stopping:
                break
            if self.restart:
                self.restart = False
                say(f"control plane stopped for a restart (status {rc})")
                backoff = 1.0
                continue
            backoff = 1.0 if time.monotonic() - started > 30 else min(backoff * 2, 30.0)
            say(f"l4lb run exited with status {rc}; starting it again in {backoff:.0f} s")
            time.sleep(backoff)
        say("stopped; the program is detached when the container's network goes")
        return 0


def main() -> int:
    gateway = need("L4LB_GATEWAY_IP")
    encap = need("L4LB_ENCAP_SOURCE")
    listen = need("L4LB_LISTEN")
    mode = os.environ.get("L4LB_ATTACH_MODE", "generic").strip() or "generic"
    if subprocess.run(["l4lb-node-prep"]).returncode:
        return 1
    ifname = data_interface(gateway)
    mac = gateway_mac(ifname, gateway)
    say(f"data interface {ifname}; gateway {gateway} is {mac}; encapsulation source {encap}; "
        f"attach mode {mode}")
    make_tls(listen.rpartition(":")[0].strip("[]"))
    start_config(mac, encap)
    argv = ["l4lb", "run", "--interface", ifname, "--listen", listen, "--attach-mode", mode,
            "--tls-cert", str(TLS_DIR / "server.pem"), "--tls-key", str(TLS_DIR / "server.key"),
            "--tls-client-ca", str(TLS_DIR / "ca.pem"),
            *shlex.split(os.environ.get("L4LB_RUN_ARGS", ""))]
    return Supervisor(argv, PIN_ROOT / ifname).run()


if __name__ == "__main__":
    sys.exit(main())
