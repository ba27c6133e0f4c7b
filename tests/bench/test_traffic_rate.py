"""The traffic-rate benchmark's generator and its measurements, small:
every frame generated comes back through the LB (and the reflector) and, end
to end, reaches the backends; every SYN of the new-connections stream makes a
connection-table entry."""
import pytest

from bench import traffic

pytestmark = pytest.mark.kernel


def test_generator_frames_pass_the_lb_and_the_reflector_and_reach_the_backends():
    res = traffic.run(count=5000, say=lambda m: None, iperf=(1, 1))
    for part in ("end_to_end", "balancer", "reflector"):
        assert res[part]["sent"] == 5000
    # nothing lost at this size: every frame came back, and every one reached a backend
    assert res["end_to_end"]["backends_received"] == 5000
    assert res["balancer"]["returned"] == 5000
    assert 5000 <= res["reflector"]["returned"] <= 5010  # plus a stray neighbour message at most
    assert res["ratio"] > 0
    # new connections: every SYN came back, each a new flow with its own entry
    conn = res["connections"]
    assert conn["balancer"]["sent"] == conn["reflector"]["sent"] == 5000
    assert conn["balancer"]["returned"] == 5000
    assert conn["balancer"]["ct_insert"] == 5000
    assert 5000 <= conn["reflector"]["returned"] <= 5010
    assert conn["ratio"] > 0
    for case in ("P1", "P4"):  # iperf3 ran both ways
        assert res["iperf3"][case]["lb_gbps"] > 0 and res["iperf3"][case]["direct_gbps"] > 0
