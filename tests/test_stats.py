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
