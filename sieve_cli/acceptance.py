"""When a candidate's metric is acceptable: the tolerance rule every search strategy shares; pure."""

from __future__ import annotations


def acceptance_threshold(dense: float, tolerance: float, absolute: bool = False) -> float:
    """The lowest acceptable metric: dense - tol (absolute) or dense - tol * |dense| (relative).

    |dense| rather than dense keeps "higher is better" right for metrics that are negative
    (e.g. a negated perplexity): (1 - tol) x dense would then lie above dense.
    """
    return dense - tolerance if absolute else dense - tolerance * abs(dense)


def is_acceptable(metric: float, threshold: float) -> bool:
    # a hair of slack so a candidate that scores exactly the threshold is not lost to rounding
    return metric >= threshold - 1e-12
