"""A Docker engine and the Debian base image for l4lb's containers.

`ensure_engine()` uses the engine the `docker` command reaches; if none
answers it starts one (installing Debian's docker.io first when it is
missing), with its default bridge and every network it allocates inside
198.19.0.0/16, the range l4lb keeps for Docker. `ensure_base_image()` makes
sure `l4lb/bookworm-base` exists: kept if present, pulled from a registry if
one answers, otherwise built here with `debootstrap --variant=minbase
bookworm` and `docker import`. Standard library only, so that it also runs
with the system python3, from the repository root:

    python3 tests/docker/dockerenv.py engine   # make sure an engine runs (leaves it running)
    python3 tests/docker/dockerenv.py base     # make sure the base image exists
    python3 tests/docker/dockerenv.py stop     # stop the engine `engine` started

The Docker tests (test_compose.py, dockerstack.py beside this file) use it
as a module.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE = "l4lb/bookworm-base"
REGISTRY_IMAGE = "debian:bookworm-slim"  # what a machine with a registry pulls instead
DEBIAN_MIRROR = os.environ.get("L4LB_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BRIDGE_IP = "198.19.0.1/24"
ADDRESS_POOL = "base=198.19.0.0/16,size=24"
DOCKERD_LOG = Path("/var/log/l4lb-dockerd.log")
DOCKERD_PIDFILE = Path("/run/l4lb-dockerd.pid")  # written only for an engine started here
LOCAL_CA_SOURCE = Path("/usr/local/share/ca-certificates")
LOCAL_CA_DIR = REPO / "docker" / "local-ca"


class DockerEnvError(Exception):
    """No engine, compose or base image could be had; the message says why."""


log = logging.getLogger("l4lb.docker")


def _say(msg: str) -> None:
    log.info("%s", msg)


def _run(cmd: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _ok(cmd: list[str], timeout: float = 30) -> bool:
    try:
        return _run(cmd, timeout=timeout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@dataclass
class Engine:
    docker: list[str]
    compose: list[str] = field(default_factory=list)
    started_pid: int | None = None  # the dockerd this process started, if any
    version: str = ""

    def env(self) -> dict[str, str]:
        """Environment for docker and compose commands: the classic builder, which
        both the engine's own CLI and Compose 1.29 use and which needs no plugin."""
        e = dict(os.environ)
        e.setdefault("DOCKER_BUILDKIT", "0")
        e.setdefault("COMPOSE_DOCKER_CLI_BUILD", "0")
        return e

    def run(self, *args: str, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
        r = _run([*self.docker, *args], timeout=timeout, env=self.env(), **kw)
        if check and r.returncode:
            raise DockerEnvError(f"docker {' '.join(args)}: {(r.stderr or r.stdout).strip()[-2000:]}")
        return r

    def stop(self) -> None:
        """Stops the engine if this process started it (by its pid); otherwise nothing."""
        if self.started_pid:
            stop_engine(self.started_pid)
            self.started_pid = None


def _can_install() -> bool:
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def _apt_install(*packages: str) -> None:
    _say(f"installing {' '.join(packages)} from Debian")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages], timeout=600, env=env)
    if r.returncode:
        _run(["apt-get", "update", "-q"], timeout=300, env=env)
        r = _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages], timeout=600, env=env)
    if r.returncode:
        raise DockerEnvError(f"apt-get install {' '.join(packages)} failed: {r.stderr.strip()[-500:]}")


def _docker_cli() -> list[str]:
    path = shutil.which("docker")
    if path:
        return [path]
    if not _can_install():
        raise DockerEnvError("no docker command, and Debian's docker.io cannot be installed here "
                             "(needs root and apt-get)")
    _apt_install("docker.io")
    path = shutil.which("docker")
    if not path:
        raise DockerEnvError("docker.io is installed but there is still no docker command")
    return [path]


def _server_version(docker: list[str]) -> str | None:
    try:
        r = _run([*docker, "version", "--format", "{{.Server.Version}}"], timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_engine(docker: list[str], wait: float = 90) -> int:
    """Starts dockerd in the background on the default socket, its bridge and
    address pools in 198.19.0.0/16; returns its pid once it answers."""
    if os.environ.get("DOCKER_HOST"):
        raise DockerEnvError(f"DOCKER_HOST={os.environ['DOCKER_HOST']} does not answer; "
                             "not starting another engine in its place")
    if os.geteuid() != 0:
        raise DockerEnvError("no Docker engine answers and starting one needs root")
    dockerd = shutil.which("dockerd")
    if not dockerd:
        if not _can_install():
            raise DockerEnvError("no dockerd, and Debian's docker.io cannot be installed here")
        _apt_install("docker.io")
        dockerd = shutil.which("dockerd")
        if not dockerd:
            raise DockerEnvError("docker.io is installed but there is no dockerd")
    default_pidfile = Path("/var/run/docker.pid")
    with contextlib.suppress(OSError, ValueError):
        other = int(default_pidfile.read_text().strip())
        if _pid_alive(other):
            raise DockerEnvError(f"a dockerd (pid {other}) is running but does not answer; "
                                 f"see its log, or stop it and try again")
    cmd = [dockerd, "--bip", BRIDGE_IP, "--default-address-pool", ADDRESS_POOL]
    _say(f"starting {' '.join(cmd)} (log {DOCKERD_LOG})")
    DOCKERD_LOG.parent.mkdir(parents=True, exist_ok=True)
    with open(DOCKERD_LOG, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = DOCKERD_LOG.read_text(errors="replace").strip().splitlines()[-5:]
            raise DockerEnvError(f"dockerd exited with status {proc.returncode}: " + " | ".join(tail))
        if _server_version(docker):
            with contextlib.suppress(OSError):
                DOCKERD_PIDFILE.write_text(f"{proc.pid}\n")
            return proc.pid
        time.sleep(0.5)
    stop_engine(proc.pid)
    raise DockerEnvError(f"dockerd did not answer within {wait:.0f} s (log {DOCKERD_LOG})")


def stop_engine(pid: int, wait: float = 60) -> None:
    """SIGTERM to the dockerd started here (it stops its containers and its containerd)."""
    if not _pid_alive(pid):
        return
    _say(f"stopping the Docker engine started for this run (pid {pid})")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not _pid_alive(pid):
            break
        time.sleep(0.2)
    else:
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(OSError, ValueError):
        if int(DOCKERD_PIDFILE.read_text().strip()) == pid:
            DOCKERD_PIDFILE.unlink()


def find_compose(docker: list[str], install: bool = True) -> list[str]:
    """The Compose v2 plugin (`docker compose`) if there is one, else
    `docker-compose` (Debian's 1.29), installed if missing and possible."""
    if _ok([*docker, "compose", "version"]):
        return [*docker, "compose"]
    path = shutil.which("docker-compose")
    if not path and install and _can_install():
        _apt_install("docker-compose")
        path = shutil.which("docker-compose")
    if not path:
        raise DockerEnvError("neither `docker compose` nor `docker-compose` is available")
    return [path]


def ensure_engine(install: bool = True, start: bool = True) -> Engine:
    """An engine that answers: the one `docker` reaches, or one started here."""
    docker = _docker_cli() if install else ([shutil.which("docker")] if shutil.which("docker") else [])
    if not docker:
        raise DockerEnvError("no docker command")
    version = _server_version(docker)
    started = None
    if not version:
        if not start:
            raise DockerEnvError("no Docker engine answers")
        started = start_engine(docker)
        version = _server_version(docker) or "?"
    eng = Engine(docker=docker, started_pid=started, version=version)
    try:
        eng.compose = find_compose(docker, install=install)
    except DockerEnvError:
        eng.stop()
        raise
    return eng


def stage_local_cas(dest: Path = LOCAL_CA_DIR, source: Path = LOCAL_CA_SOURCE) -> list[str]:
    """Copies the CA certificates this machine trusts beyond Debian's set
    (/usr/local/share/ca-certificates) into docker/local-ca/, where the images
    pick them up: a network that reaches PyPI through a TLS-inspecting proxy
    needs its CA inside the build too. Returns the names copied."""
    dest.mkdir(parents=True, exist_ok=True)
    want = {}
    if source.is_dir():
        for crt in sorted(source.rglob("*.crt")):
            if crt.is_file():
                want[crt.name] = crt.read_bytes()
    for old in dest.glob("*.crt"):
        if old.name not in want:
            old.unlink()
    for name, data in want.items():
        target = dest / name
        if not target.exists() or target.read_bytes() != data:
            target.write_bytes(data)
    return sorted(want)


def image_exists(engine: Engine, ref: str) -> bool:
    return engine.run("image", "inspect", "--format", "{{.Id}}", ref, check=False, timeout=30).returncode == 0


def ensure_base_image(engine: Engine, tag: str = BASE_IMAGE, pull_timeout: float = 30) -> str:
    """Returns how the base image was had: 'present', 'pulled' or 'built'."""
    if image_exists(engine, tag):
        return "present"
    try:
        r = engine.run("pull", REGISTRY_IMAGE, check=False, timeout=pull_timeout)
        pulled = r.returncode == 0
        why = (r.stderr or r.stdout).strip().splitlines()[-1:] if not pulled else []
    except subprocess.TimeoutExpired:
        pulled, why = False, [f"no answer within {pull_timeout:.0f} s"]
    if pulled:
        engine.run("tag", REGISTRY_IMAGE, tag)
        _say(f"{tag}: pulled {REGISTRY_IMAGE}")
        return "pulled"
    _say(f"{tag}: no registry ({' '.join(why)[:200]}); building it here with debootstrap (about a minute)")
    build_base_image(engine, tag)
    return "built"


SOURCES = """deb {mirror} bookworm main
deb {mirror} bookworm-updates main
deb {security} bookworm-security main
"""
APT_CONF = """APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb || true"; };
"""
# like Debian's slim images: no documentation or translations in later installs
DPKG_EXCLUDES = """path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
"""


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def _trim(root: Path) -> None:
    """What a container image does without: package lists and caches,
    manuals, translations, documentation but its copyright files."""
    for pattern in ("var/lib/apt/lists/*_*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb",
                    "usr/share/man/*", "usr/share/info/*", "var/log/*.log"):
        for p in root.glob(pattern):
            _remove(p)
    for p in root.glob("usr/share/locale/*"):
        if p.name != "locale.alias":
            _remove(p)
    for d in root.glob("usr/share/doc/*"):
        if d.is_dir() and not d.is_symlink():
            for q in d.iterdir():
                if q.name != "copyright":
                    _remove(q)


def build_base_image(engine: Engine, tag: str = BASE_IMAGE) -> None:
    """debootstrap --variant=minbase bookworm into a scratch folder, trimmed,
    then `docker import` as `tag`."""
    if os.geteuid() != 0:
        raise DockerEnvError("building the base image with debootstrap needs root")
    if not shutil.which("debootstrap"):
        if not _can_install():
            raise DockerEnvError("debootstrap is missing and cannot be installed here")
        _apt_install("debootstrap")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="l4lb-base-", dir="/var/tmp") as tmp:
        root = Path(tmp) / "rootfs"
        r = _run(["debootstrap", "--variant=minbase", "bookworm", str(root), DEBIAN_MIRROR], timeout=900)
        if r.returncode:
            raise DockerEnvError(f"debootstrap failed: {(r.stderr or r.stdout).strip()[-800:]}")
        security = DEBIAN_MIRROR.rstrip("/").removesuffix("/debian") + "/debian-security"
        (root / "etc/apt/sources.list").write_text(SOURCES.format(mirror=DEBIAN_MIRROR, security=security))
        (root / "etc/apt/apt.conf.d/90l4lb-small").write_text(APT_CONF)
        (root / "etc/dpkg/dpkg.cfg.d").mkdir(parents=True, exist_ok=True)
        (root / "etc/dpkg/dpkg.cfg.d/90l4lb-small").write_text(DPKG_EXCLUDES)
        _trim(root)
        tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        try:
            r = subprocess.run([*engine.docker, "import", "--message", "debootstrap --variant=minbase bookworm",
                                "--change", 'CMD ["bash"]', "-", tag], stdin=tar.stdout, capture_output=True,
                               text=True, timeout=600, env=engine.env())
        finally:
            tar.stdout.close()
            tar.wait()
        if r.returncode or tar.returncode:
            raise DockerEnvError(f"docker import failed: {r.stderr.strip()[-500:]}")
    _say(f"{tag}: built from debootstrap in {time.monotonic() - t0:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 tests/docker/dockerenv.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["engine", "base", "stop"],
                   help="engine: make sure an engine answers (started ones keep running); "
                        "base: also make sure l4lb/bookworm-base exists; stop: stop an engine started by `engine`")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="l4lb docker: %(message)s")
    try:
        if args.what == "stop":
            try:
                pid = int(DOCKERD_PIDFILE.read_text().strip())
            except (OSError, ValueError):
                _say("no engine started by l4lb is recorded")
                return 0
            stop_engine(pid)
            return 0
        eng = ensure_engine()
        how = f"started it (pid {eng.started_pid})" if eng.started_pid else "already running"
        _say(f"engine {eng.version}: {how}; compose: {' '.join(eng.compose)}")
        if args.what == "base":
            cas = stage_local_cas()
            if cas:
                _say(f"extra CA certificates for the builds: {', '.join(cas)} (docker/local-ca/)")
            _say(f"{BASE_IMAGE}: {ensure_base_image(eng)}")
    except DockerEnvError as e:
        print(f"l4lb docker: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
