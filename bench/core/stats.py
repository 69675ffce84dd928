"""Accuracy with a 95% Wilson score interval."""

from __future__ import annotations

import math
from typing import Dict, Tuple

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
