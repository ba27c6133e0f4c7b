"""The real balancer, compiled once per session and loaded into the kernel;
each test gets it with empty maps and a default configuration (lbfixture.Lb)."""
import pytest

from l4lb import bpf, consts
from lbfixture import Lb

@pytest.fixture(scope="session")
def program():
    cap = consts.Capacity(max_vips=16, max_backends=256, ct_size=65536)
    prog = bpf.load_balancer(cap)
    yield prog, cap
    prog.close()


@pytest.fixture
def lb(program) -> Lb:
    prog, cap = program
    return Lb(prog, cap)
