"""The map registry (l4lb/consts.py MAPS) is what the compiled programs
declare: the same maps, kinds, capacities and flags, as the kernel reports
them; and the sizes Python reads from bcc are the kernel's."""
import ctypes
import json
import subprocess

import pytest

from l4lb import bpf, consts

pytestmark = pytest.mark.kernel


def kernel_maps(prog: bpf.Program) -> dict[str, dict]:
    """The kernel's description of every map the loaded program uses."""
    def show(*args):
        r = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True)
        return json.loads(r.stdout)

    info = show("prog", "show", "id", prog.fdinfo()["prog_id"])
    maps = [show("map", "show", "id", str(i)) for i in info["map_ids"]]
    return {m["name"]: m for m in maps}


def check(prog: bpf.Program, cap: consts.Capacity) -> None:
    registered = {m.name: m for m in consts.maps_of(prog.name)}
    declared = kernel_maps(prog)
    assert set(declared) == set(registered), "maps declared in xdp/ and maps in the registry differ"
    for name, spec in registered.items():
        k = declared[name]
        assert k["type"] == spec.kind, name
        assert k["max_entries"] == spec.entries(cap), name
        assert k.get("flags", 0) == spec.flags, name
        if spec.kind == "ringbuf":  # a size in bytes, no keys or values
            assert (k["bytes_key"], k["bytes_value"]) == (0, 0), name
            continue
        t = prog.table(name)
        assert k["bytes_key"] == ctypes.sizeof(t.Key), name
        assert k["bytes_value"] == ctypes.sizeof(getattr(t, "sLeaf", t.Leaf)), name


def test_the_balancer_declares_exactly_the_registered_maps(program):
    prog, cap = program
    check(prog, cap)


def test_the_decap_program_declares_exactly_the_registered_maps():
    prog = bpf.load_decap()
    try:
        check(prog, consts.Capacity(max_vips=1, ct_size=1, ring_size=3))
    finally:
        prog.close()


def test_the_layout_the_adoption_check_compares_is_the_kernels(program):
    prog, cap = program
    declared = kernel_maps(prog)
    for name, lay in bpf.layout_of(prog).items():
        k = declared[name]
        assert (lay.kind, lay.key_size, lay.value_size, lay.entries, lay.flags) == \
            (k["type"], k["bytes_key"], k["bytes_value"], k["max_entries"], k.get("flags", 0))


def test_memory_follows_the_compiled_sizes(program):
    """A backend entry is what structs.h makes it, whatever an estimate assumed."""
    prog, cap = program
    t = prog.table(consts.MAP_BACKENDS)
    backends = (cap.max_backends + 1) * (ctypes.sizeof(t.Key) + ctypes.sizeof(t.Leaf))
    rings = 2 * cap.max_vips * (4 + 4 * cap.ring_size)
    assert bpf.maps_size(prog) > backends + rings
