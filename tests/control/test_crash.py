"""A control plane killed at any instruction leaves nothing that the next
start cannot reconcile: hundreds of SIGKILLs of a process that drives a real
Controller over real pinned maps (at random times, and at every named step of
persisting and writing), each followed by a restart that must find the maps,
the model it serves and the state file in agreement, with generations that
never went backwards. Also: a full disk, and failed requests, change nothing."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from l4lb import bpf, consts, faults
from l4lb.controller import Controller
from l4lb.dataplane import Dataplane, RuntimeConfig
from l4lb.errors import L4lbError, PersistError, ValidationError
from l4lb.model import VipKey
from l4lb.state import LbModel, MapImage

pytestmark = pytest.mark.kernel
CAP = consts.Capacity(max_vips=8, max_backends=48, ct_size=1024, ring_size=251)
GW = "02:00:00:00:00:01"
VIPS = [VipKey(f"198.18.10.{i}", 80, "tcp") for i in range(1, 7)] + [VipKey("fd00:198:18:10::1", 0, "udp")]
POOL4 = [f"198.18.2.{i}" for i in range(1, 40)]
POOL6 = [f"fd00:198:18:2::{i:x}" for i in range(1, 12)]


@pytest.fixture(scope="module")
def pinned(tmp_path_factory):
    pin_dir = f"{consts.PIN_ROOT}/crash{uuid.uuid4().hex[:8]}"
    prog = bpf.load_balancer(CAP, pin_dir=pin_dir)
    yield prog, tmp_path_factory.mktemp("crash")
    prog.close()
    bpf.remove_pins(pin_dir)


def images_agree(a: MapImage, b: MapImage) -> list[str]:
    diff = []
    for name in ("vips", "vip_info", "addresses", "portless"):
        if getattr(a, name) != getattr(b, name):
            diff.append(f"{name}: {getattr(a, name)} != {getattr(b, name)}")
    ba = {i: (e.address, e.generation, e.vips) for i, e in a.backends.items()}
    bb = {i: (e.address, e.generation, e.vips) for i, e in b.backends.items()}
    if ba != bb:
        diff.append(f"backends: {ba} != {bb}")
    for vid in set(a.rings) | set(b.rings):
        if vid not in a.rings or vid not in b.rings or not a.rings[vid].same(b.rings[vid], CAP):
            diff.append(f"ring of VIP id {vid} differs")
    return diff


def controller(prog, state_file: Path) -> Controller:
    ctrl = Controller(Dataplane(prog, CAP), RuntimeConfig(gateway_mac=GW), state_file)
    saved = Controller.read_saved(state_file)
    if saved:
        ctrl.adopt(saved)
    else:
        ctrl.dp.clear()
        ctrl.dp.write_config(ctrl.runtime, portless_vips=0)
        ctrl.save()
    return ctrl


def random_change(ctrl: Controller, rnd: random.Random) -> None:
    key = rnd.choice(VIPS)
    pool = POOL6 if key.address.startswith("fd00") else POOL4 + POOL6
    pick = lambda n: rnd.sample(pool, n)  # noqa: E731
    op = rnd.randrange(6)
    try:
        if op == 0:
            ctrl.add_vip(key, rnd.choice([[], ["no_source_port"]]),
                         [(a, rnd.randint(0, 65535)) for a in pick(rnd.randint(0, 8))])
        elif op == 1:
            ctrl.delete_vip(key)
        elif op == 2:
            ctrl.add_backends(key, [(a, rnd.randint(1, 5)) for a in pick(rnd.randint(1, 4))])
        elif op == 3:
            ctrl.remove_backends(key, pick(rnd.randint(1, 2)))
        elif op == 4:
            ctrl.set_weights(key, [(a, rnd.randint(0, 65535)) for a in pick(1)])
        else:
            ctrl.modify_vip(key, rnd.choice([[], ["no_conntrack"], ["no_source_port"]]))
    except L4lbError:
        pass  # refused requests are part of the mix


def run_child(prog, state_file: Path, seed: int, point: str | None = None, count: int = 1) -> int:
    """Forks a process that drives the controller until it is killed."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            rnd = random.Random(seed)
            ctrl = controller(prog, state_file)
            if point:
                faults.arm(point, count)
            for _ in range(100000):
                random_change(ctrl, rnd)
        finally:
            os._exit(0)
    return pid


def check_after_restart(prog, state_file: Path, high: dict[int, int]) -> Controller:
    ctrl = controller(prog, state_file)
    saved = LbModel.from_dict(CAP, Controller.read_saved(state_file)["state"])
    assert images_agree(ctrl.dp.read_image(), ctrl.model.image()) == [], "maps and model disagree"
    assert images_agree(saved.image(), ctrl.model.image()) == [], "file and model disagree"
    for i, g in enumerate(ctrl.model.generations):
        assert g >= high.get(i, 0), f"backend index {i}: generation went back from {high[i]} to {g}"
        high[i] = g
    for i, g in enumerate(ctrl.model.vip_generations):
        assert g >= high.get(-1 - i, 0), f"VIP id {i}: generation went back"
        high[-1 - i] = g
    return ctrl


def test_kills_at_random_times_leave_maps_model_and_file_in_agreement(pinned):
    prog, tmp = pinned
    state_file = tmp / "random" / "state.json"
    high: dict[int, int] = {}
    kills = 0
    rnd = random.Random(7)
    for i in range(220):
        pid = run_child(prog, state_file, seed=i)
        time.sleep(rnd.uniform(0.0, 0.05))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        kills += os.WIFSIGNALED(status)
        check_after_restart(prog, state_file, high)
    assert kills >= 200
    assert sum(1 for g in high.values() if g) > 10, "the children made almost no changes"


@pytest.mark.parametrize("point", faults.POINTS)
def test_a_kill_at_each_named_step_is_reconciled(pinned, point):
    prog, tmp = pinned
    state_file = tmp / point / "state.json"
    high: dict[int, int] = {}
    for count in (1, 2, 3, 5, 8, 13):
        pid = run_child(prog, state_file, seed=count, point=point, count=count)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
            f"the child never reached {point} #{count}"
        check_after_restart(prog, state_file, high)


@pytest.fixture
def full_disk(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_fails_the_request_and_changes_nothing(pinned, full_disk):
    prog, _ = pinned
    state_file = full_disk / "state.json"
    ctrl = controller(prog, state_file)
    ctrl.add_vip(VIPS[0], [], [("198.18.2.1", 1), ("198.18.2.2", 1)])
    fd = os.open(full_disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:  # leaves no room for another state file
        while os.write(fd, b"\0" * 512):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    before_file = state_file.read_bytes()
    before_maps = ctrl.dp.read_image()
    before_model = ctrl.model.to_dict()
    with pytest.raises(PersistError, match="disk is full"):
        ctrl.add_vip(VIPS[1], [], [(a, 1) for a in POOL4[:30]])
    assert state_file.read_bytes() == before_file
    assert ctrl.model.to_dict() == before_model
    assert images_agree(ctrl.dp.read_image(), before_maps) == []
    (full_disk / "filler").unlink()
    ctrl.add_vip(VIPS[1], [], [("198.18.2.3", 1)])  # room again: it works
    assert check_after_restart(prog, state_file, {}).model.get(VIPS[1]).backends == {"198.18.2.3": 1}


def test_failed_requests_take_no_backend_slots(pinned):
    prog, tmp = pinned
    state_file = tmp / "leak" / "state.json"
    ctrl = controller(prog, state_file)
    ctrl.add_vip(VIPS[0], [], [("198.18.2.1", 1)])
    base = ctrl.model.to_dict()
    too_many = [(f"198.18.{3 + i // 200}.{i % 200 + 1}", 1) for i in range(CAP.ring_size + 1)]
    for _ in range(12):
        with pytest.raises(L4lbError):
            ctrl.add_vip(VIPS[1], [], too_many)
        with pytest.raises(ValidationError, match="listed twice"):
            ctrl.add_vip(VIPS[2], [], [("fd00:198:18:2::1", 1), ("FD00:198:18:2:0::1", 2)])
        with pytest.raises(L4lbError):
            ctrl.add_backends(VIPS[0], [(f"198.18.4.{i}", 1) for i in range(1, CAP.max_backends + 1)])
    assert ctrl.model.to_dict() == base
    assert len(ctrl.model.backends) == 1
    ctrl.add_vip(VIPS[1], [], [(f"198.18.4.{i}", 1) for i in range(1, CAP.max_backends)])  # all the rest free
    assert len(ctrl.model.backends) == CAP.max_backends


def test_pinned_maps_of_another_layout_are_named(pinned, tmp_path):
    """Every pinned map is compared, vip_info and vip_filter too."""
    prog, _ = pinned
    pin_dir = f"{consts.PIN_ROOT}/lay{uuid.uuid4().hex[:8]}"
    os.makedirs(pin_dir)
    try:
        for name, value in (("vip_info", 16), ("vip_filter", 8)):
            subprocess.run(["bpftool", "map", "create", f"{pin_dir}/{name}", "type", "array", "key", "4",
                            "value", str(value), "entries", "8", "name", name], check=True)
        diff = bpf.layout_differences(pin_dir, prog)
        assert [d.split(":")[0] for d in diff] == ["vip_info", "vip_filter"]
    finally:
        bpf.remove_pins(pin_dir)
