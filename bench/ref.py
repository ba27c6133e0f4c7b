"""The code of another commit, built beside the working tree's, for A/B timings
(`python -m bench.pktcost --against REF`).

The commit's `l4lb/` and `xdp/` are extracted with `git archive` into a fresh
directory, the package renamed (`l4lb_ref_<commit>`) so that it imports next to
the working tree's `l4lb` without either shadowing the other. The old package
uses relative imports and finds its `xdp/` beside itself, so it compiles its own
program with its own constants, map layout and names. `Code` gathers the
modules a benchmark drives (compile, map writes, the desired state, the model);
bench.balancer.Balancer sets up either build the same way through them."""
from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from l4lb.errors import L4lbError

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Code:
    """One build of l4lb: the modules that load a balancer and fill its maps."""

    label: str           # "working tree" or the commit
    bpf: ModuleType
    dataplane: ModuleType
    state: ModuleType
    model: ModuleType
    consts: ModuleType
    package: ModuleType

    @classmethod
    def of(cls, package: str, label: str) -> "Code":
        mod = lambda name: importlib.import_module(f"{package}.{name}")  # noqa: E731
        return cls(label, mod("bpf"), mod("dataplane"), mod("state"), mod("model"),
                   mod("consts"), importlib.import_module(package))

    @property
    def syn_table(self) -> bool:
        """The build keeps a SYN's entry in a SYN table (xdp/conntrack.h) until the
        flow's next packet moves it into the connection table."""
        return hasattr(self.consts, "MAP_CT_SYN")

    def capacity(self, cap):
        """The same sizes as this build's own Capacity."""
        return self.consts.Capacity(max_vips=cap.max_vips, max_backends=cap.max_backends,
                                    ct_size=cap.ct_size, ring_size=cap.ring_size)

    def vip_key(self, key):
        """A VipKey of the working tree as this build's own."""
        return self.model.VipKey.parse(key.address, key.port, key.protocol)

    def vip_spec(self, spec):
        """The spec in this build's own type; the encapsulation where the build has it
        (builds before GUE only know IP-in-IP)."""
        extra = {"encap": spec.encap} if hasattr(self.consts, "ENCAPS") else {}
        return self.model.VipSpec(self.vip_key(spec.key), frozenset(spec.flags),
                                  dict(spec.backends), **extra)

    def clear(self, dp) -> None:
        """Every map of a loaded balancer back to empty (older builds kept this in
        l4lb/reset.py)."""
        if hasattr(dp, "clear"):
            dp.clear()
        else:
            importlib.import_module(f"{self.package.__name__}.reset").clear_maps(dp)


def worktree() -> Code:
    return Code.of("l4lb", "working tree")


def resolve(ref: str) -> str:
    """The full commit hash of `ref`; an error that names it when git does not know it."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                             capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise L4lbError(f"--against {ref}: not a commit of {REPO} ({getattr(e, 'stderr', e)})") from e
    return out.stdout.strip()


class RefCode:
    """The commit's l4lb/ and xdp/ extracted and imported; close() removes them."""

    def __init__(self, ref: str):
        self.commit = resolve(ref)
        self.dir = Path(tempfile.mkdtemp(prefix="l4lb-ref-"))
        name = f"l4lb_ref_{self.commit[:12]}"
        try:
            archive = subprocess.run(["git", "-C", str(REPO), "archive", self.commit, "l4lb", "xdp"],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(self.dir)], input=archive, check=True)
            (self.dir / "l4lb").rename(self.dir / name)
            sys.path.insert(0, str(self.dir))
            self.code = Code.of(name, f"{ref} ({self.commit[:10]})")
        except (OSError, subprocess.CalledProcessError, ImportError) as e:
            self.close()
            raise L4lbError(f"cannot build the code of {ref} beside the working tree: {e}") from e

    def close(self) -> None:
        if str(self.dir) in sys.path:
            sys.path.remove(str(self.dir))
        shutil.rmtree(self.dir, ignore_errors=True)
