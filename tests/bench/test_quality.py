"""Maglev quality figures, computed small: balance within one entry,
disruption never below the ideal and close to it for M >> N."""
from bench import quality


def test_balance_is_within_one_entry():
    for m in (4099, 65537):
        for n in (3, 10, 100, 1000):
            b = quality.balance(n, m)
            assert b["within_one_entry"]
            assert b["max_over_mean"] <= b["bound_max_over_mean"] + 1e-12
            assert b["min_over_mean"] <= 1 <= b["max_over_mean"]


def test_disruption_is_at_least_the_ideal_and_near_it():
    import numpy as np

    rng = np.random.default_rng(1)
    d = quality.disruption(100, 65537, 3, rng)
    for key, nominal in (("one_leaves", 1 / 100), ("one_joins", 1 / 101)):
        s = d[key]
        assert s["changed_mean"] >= s["ideal_mean"] > 0
        assert abs(s["ideal_mean"] - nominal) < 0.2 * nominal
        assert s["changed_mean"] < 2.5 * s["ideal_mean"]


def test_more_failures_change_more_and_a_larger_table_changes_less():
    import numpy as np

    small = quality.failures(200, 65537, (1, 10, 40), 2, np.random.default_rng(2))
    large = quality.failures(200, 655373, (1, 10, 40), 2, np.random.default_rng(2))
    assert [f["changed_mean"] for f in small] == sorted(f["changed_mean"] for f in small)
    for s, l_ in zip(small, large):
        assert s["changed_mean"] >= s["ideal_mean"]
        assert l_["changed_mean"] <= s["changed_mean"]


def test_report_names_the_paper_and_its_setup():
    res = quality.run(sizes=(4099,), ns=(10, 40), ks=(1, 4), trials=1, log=lambda m: None)
    assert res["ok"]
    assert "NSDI 2016" in res["paper"]["source"]
    assert "65537" in res["paper"]["setup"] and "655373" in res["paper"]["setup"]
    assert len(res["balance"]) == 2 and len(res["failures"]) == 2
