"""End-to-end fixtures: one testbed per module (building one takes seconds),
in each decapsulation mode: the XDP decap program, and the kernel's ipip and
ip6tnl devices where the kernel has them (skipped, with the reason, where not)."""
import pytest

from control.launcher import launcher
from e2e_util import Lb
from l4lb.testbed import Testbed, ipip_support

_notes: set[str] = set()


@pytest.fixture(scope="module", params=["xdp", "ipip"], ids=["decap-xdp", "decap-ipip"])
def bed(request):
    if request.param == "ipip":
        ok, why = ipip_support()
        if not ok:
            _notes.add(f"ipip decapsulation tests skipped: {why}; the XDP decap program ran them")
            pytest.skip(f"ipip decapsulation: {why}")
    with Testbed(decap=request.param, launcher=launcher()) as tb:
        yield tb


@pytest.fixture(scope="module")
def lb(bed):
    api = Lb(bed)
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def fleet_report():
    """Adds a line to the summary at the end of the run (measured figures)."""
    return _notes.add


def pytest_terminal_summary(terminalreporter):
    for note in sorted(_notes):
        terminalreporter.write_line(f"e2e: {note}")
