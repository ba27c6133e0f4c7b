#!/bin/bash
# make setup: everything a fresh Debian 12 machine needs to build, run and
# test l4lb. Idempotent: a second run checks and returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
need_root() { [ "$(id -u)" = 0 ] || { echo "make setup must run as root (apt-get, bpffs, XDP)" >&2; exit 1; }; }
need_root

APT_PACKAGES=(python3-bpfcc bpfcc-tools libbpf1 bpftool python3-venv python3-dev gcc make
              iproute2 ethtool tcpdump kmod openssl linux-headers-amd64 iperf3 prometheus)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    say "system packages present"
fi
# prometheus comes for its server and promtool (the metrics tests start their
# own server on loopback, with their own configuration and data directory);
# the packaged service would hold ports 9090/9100, so it is stopped and disabled
for unit in prometheus prometheus-node-exporter; do
    if command -v systemctl >/dev/null && systemctl is-enabled "$unit" >/dev/null 2>&1; then
        systemctl disable --now "$unit" >/dev/null 2>&1 || true
        say "disabled the packaged $unit service (tests start their own)"
    fi
done

# bcc compiles against /lib/modules/$(uname -r)/build. Prefer the running
# kernel's own headers; fall back to Debian's newest packaged headers, which
# serve XDP programs well (they only need the UAPI and network headers).
KREL="$(uname -r)"
MOD="/lib/modules/$KREL"
if [ -e "$MOD/build/include" ]; then
    target="$(readlink -f "$MOD/build")"
    case "$target" in
        *"$KREL"*) say "kernel headers: exact, $target" ;;
        *) say "kernel headers: FALLBACK $target (no package for $KREL)" ;;
    esac
else
    if apt-get install -y -q --no-install-recommends "linux-headers-$KREL" >/dev/null 2>&1; then
        say "kernel headers: exact package linux-headers-$KREL"
    else
        arch_dir="$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1)"
        common_dir="$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1)"
        if [ -z "$arch_dir" ] || [ -z "$common_dir" ]; then
            echo "no kernel headers found under /usr/src; install linux-headers-amd64" >&2
            exit 1
        fi
        mkdir -p "$MOD"
        ln -sfn "$arch_dir" "$MOD/build"
        ln -sfn "$common_dir" "$MOD/source"
        say "kernel headers: no package for $KREL; FALLBACK to $(basename "$arch_dir") (build) and $(basename "$common_dir") (source)"
    fi
fi

# BIRD 2 for the fleet testbed (every BIRD there runs in a test namespace with
# its own config, socket and pid file). The distribution's own bird service is
# kept from starting at install (policy-rc.d) and disabled: it would otherwise
# run with /etc/bird/bird.conf in the host's namespace.
if ! dpkg-query -W -f='${Status}' bird2 2>/dev/null | grep -q "ok installed"; then
    say "installing bird2 (its system service stays off)"
    export DEBIAN_FRONTEND=noninteractive
    policy=/usr/sbin/policy-rc.d
    had_policy=0; [ -e "$policy" ] && had_policy=1
    [ "$had_policy" = 1 ] || { printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"; }
    apt-get install -y -q --no-install-recommends bird2 || { [ "$had_policy" = 1 ] || rm -f "$policy"; exit 1; }
    [ "$had_policy" = 1 ] || rm -f "$policy"
fi
if [ -d /run/systemd/system ] && systemctl is-enabled bird >/dev/null 2>&1; then
    systemctl disable --now bird >/dev/null 2>&1 || true
    say "disabled the system's bird service (the testbed runs its own BIRDs)"
fi

if ! grep -q " /sys/fs/bpf bpf " /proc/mounts; then
    mount -t bpf bpf /sys/fs/bpf
    say "mounted bpffs on /sys/fs/bpf"
fi

# The venv sees the system site packages: bcc comes from Debian (the PyPI
# package named bcc is unrelated).
if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.l4lb-installed
want="$(cat pyproject.toml setup.py | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    say "installing l4lb (editable) with dev extras"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[dev]'
    echo "$want" > "$stamp"
else
    say "python packages up to date"
fi
# the Maglev fill loop, compiled next to its module (rebuilt only when changed)
so="$(ls l4lb/_maglev_fill.*.so 2>/dev/null | head -1 || true)"
if [ -z "$so" ] || [ l4lb/_maglev_fill.c -nt "$so" ]; then
    say "building the Maglev fill loop"
    .venv/bin/python setup.py -q build_ext --inplace >/dev/null
    rm -rf build
fi
.venv/bin/python -c "import bcc, mmh3, grpc, pyroute2, scapy; from l4lb import maglev; assert maglev.accelerated()" \
    || { echo "setup check failed: a module does not import" >&2; exit 1; }
say "ready: run 'make test'"
