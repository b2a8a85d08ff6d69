"""The uniform search: one kept fraction p for every matrix, found by binary search over a grid; pure.

Nothing here touches a model, a file or a clock: the caller supplies the metric as a callback.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .acceptance import is_acceptable


@dataclass(frozen=True)
class UniformResult:
    p: float  # the smallest acceptable kept fraction found (1.0 when none below 1 is)
    metric: float | None  # its metric; None when p is 1.0 and was not evaluated
    trials: list[tuple[float, float]]  # (p, metric) in evaluation order


def uniform_grid(step: float) -> list[float]:
    """Kept fractions step, 2 step, ... below 1, ascending (1.0 itself is the dense model)."""
    if not 0 < step < 1:
        raise ValueError(f"grid step must be in (0, 1), got {step}")
    count = math.ceil(1 / step - 1e-9) - 1
    return [round(step * k, 6) for k in range(1, count + 1)]


def first_probe(grid: Sequence[float]) -> float | None:
    """The p the binary search over `grid` evaluates first."""
    return sorted(grid)[(len(grid) - 1) // 2] if grid else None


def binary_search(grid: Sequence[float], metric_at: Callable[[float], float], threshold: float,
                  ahead: Callable[[float, float | None], None] | None = None) -> UniformResult:
    """The smallest p in the ascending `grid` whose metric is acceptable.

    Assumes acceptability is monotone in p (keeping more never hurts); 1.0 is acceptable
    by definition, so a grid of n points costs ceil(log2(n + 1)) evaluations. `ahead(p, q)`,
    when given, is told before p is evaluated that q comes next if p fails (None: nothing
    does), so a caller with an idle worker can score q beside p; the search does not depend on it.
    """
    grid = sorted(grid)
    lo, hi = -1, len(grid)  # grid[lo] unacceptable (or none), grid[hi] acceptable (or 1.0)
    trials: list[tuple[float, float]] = []
    best_metric = None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ahead is not None:  # failing moves lo to mid: the next probe is then midway between mid and hi
            ahead(grid[mid], grid[(mid + hi) // 2] if hi - mid > 1 else None)
        metric = metric_at(grid[mid])
        trials.append((grid[mid], metric))
        if is_acceptable(metric, threshold):
            hi, best_metric = mid, metric
        else:
            lo = mid
    p = grid[hi] if hi < len(grid) else 1.0
    return UniformResult(p=p, metric=best_metric, trials=trials)
