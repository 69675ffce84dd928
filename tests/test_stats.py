from bench.stats import accuracy_summary, wilson_interval


def test_wilson_matches_known_values():
    lo, hi = wilson_interval(411, 512)  # 80.27%
    assert abs(lo - 0.7663) < 1e-3 and abs(hi - 0.8348) < 1e-3
    lo, hi = wilson_interval(0, 512)
    assert lo == 0.0 and abs(hi - 0.00745) < 1e-4
    lo, hi = wilson_interval(10, 10)
    assert abs(hi - 1.0) < 1e-9 and abs(lo - 0.7225) < 1e-3


def test_summary_is_numbers():
    s = accuracy_summary(3, 4)
    assert s["accuracy"] == 0.75 and s["correct"] == 3 and isinstance(s["ci95"][0], float)


def test_mcnemar_exact_matches_binomial_tails():
    from bench.core.stats import mcnemar_exact

    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 0) == mcnemar_exact(0, 5) == 2 / 2**5  # 0.0625
    assert mcnemar_exact(3, 0) == 0.25
    assert mcnemar_exact(1, 1) == 1.0
    assert abs(mcnemar_exact(6, 1) - 0.125) < 1e-12  # 2 * (1 + 7) / 128
    assert abs(mcnemar_exact(31, 14) - 0.0161) < 1e-4


def test_paired_mean_difference():
    from bench.core.stats import paired_mean_difference

    d = paired_mean_difference([1.0, 0.5, 0.0, 1.0], [0.0, 0.5, 0.0, 0.0])
    assert d["difference"] == 0.5 and d["higher_a"] == 2 and d["higher_b"] == 0 and d["n"] == 4
    assert d["ci95"][0] < 0.5 < d["ci95"][1]
    # the p-value and the interval are one approximation: the interval excludes 0 exactly when p < 0.05
    for a, b in (([1.0, 0.9, 0.8, 0.0] * 10, [0.0] * 40), ([1.0, 0.0] * 10, [0.0, 0.9] * 10)):
        e = paired_mean_difference(a, b)
        assert (e["p"] < 0.05) == (e["ci95"][0] > 0 or e["ci95"][1] < 0)
    assert paired_mean_difference([0.5, 0.5], [0.5, 0.5])["p"] == 1.0
