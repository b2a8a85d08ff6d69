"""95% intervals of the evaluator's metrics: Wilson for a proportion, the delta method for a token-weighted ratio."""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sane at 0%, 100% and small n)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def ratio_interval(correct: list[float], counts: list[float], z: float = Z95) -> tuple[float, float]:
    """95% interval of a token-weighted accuracy sum(c)/sum(n), examples as clusters (delta method).

    Tokens of one example are not independent; treating them so would make the interval far too narrow.
    """
    m, total = len(counts), sum(counts)
    if m < 2 or total == 0:
        return 0.0, 1.0
    r = sum(correct) / total
    var = m / (m - 1) * sum((c - r * n) ** 2 for c, n in zip(correct, counts)) / total**2
    half = z * math.sqrt(var)
    return max(0.0, r - half), min(1.0, r + half)
