"""Accuracy with a 95% Wilson score interval; paired comparisons of two records on the same points."""

from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

Z95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = Z95) -> Tuple[float, float]:
    """Wilson score interval for a binomial proportion (well-behaved at 0 and n, unlike the normal one)."""
    if n <= 0:
        raise ValueError("n must be positive")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_summary(correct: int, n: int) -> Dict[str, object]:
    lo, hi = wilson_interval(correct, n)
    return {"correct": int(correct), "n": int(n), "accuracy": correct / n, "ci95": [lo, hi]}


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar test for paired binary outcomes: given the discordant pairs (points right only under A,
    only under B), the probability of a split at least this uneven if each pair were a fair coin (binomial, p = 1/2).
    Also the exact sign test, when the counts are the positive and negative paired differences."""
    if only_a < 0 or only_b < 0:
        raise ValueError("counts must be non-negative")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_mean_difference(a: Sequence[float], b: Sequence[float], z: float = Z95) -> Dict[str, float]:
    """Mean of the per-point differences a - b with a normal 95% interval and the two-sided p-value of the same
    normal approximation (the points are the unit of sampling; the interval excludes 0 exactly when p < 0.05)."""
    if len(a) != len(b) or not a:
        raise ValueError("need two equally long, non-empty sequences")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    se = sd / math.sqrt(n)
    half = z * se
    p = 1.0 if se == 0 and mean == 0 else (0.0 if se == 0 else math.erfc(abs(mean) / se / math.sqrt(2)))
    return {"difference": mean, "ci95": [mean - half, mean + half], "p": p, "n": n,
            "higher_a": sum(x > 0 for x in d), "higher_b": sum(x < 0 for x in d)}
