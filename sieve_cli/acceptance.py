"""When a candidate's metric is acceptable: the tolerance rule every search strategy shares; pure.

A candidate is judged against the dense model on the same examples (paired): the per-example
differences give the metric's drop and its standard error, and the candidate counts at the
*lower confidence bound* of its metric, dense - (drop + z * se). So a plan is acceptable only
when the evidence says its drop is within the tolerance at the requested confidence, not
when a lucky draw of examples made it look so. Without per-example scores (a user's own
`eval_fn` in the Python API) the point estimate is all there is, and it is used as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist


@dataclass(frozen=True)
class Measurement:
    """A model's metric on one split part, with what pairing needs.

    `scores[i]` is example i's metric (accuracy 0/1, or its token accuracy), `weights[i]` its
    weight in the metric (1, or its scored tokens), so value = sum(w s) / sum(w). `soft[i]` is a
    low-noise per-example signal (the log-probability of the gold answer among the choices, or
    the mean log-likelihood per target token): paired with dense it shows a real drop before
    any answer flips.
    """

    value: float
    scores: tuple[float, ...] = ()
    weights: tuple[float, ...] = ()
    soft: tuple[float, ...] = ()
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def paired(self) -> bool:
        return len(self.scores) > 0

    def to_record(self) -> dict:
        """The JSON a checkpoint keeps, so a resumed search pairs with the very same scores."""
        return {"value": self.value, "scores": self.scores, "weights": self.weights, "soft": self.soft,
                "extra": self.extra}

    @classmethod
    def from_record(cls, saved: dict) -> "Measurement":
        return cls(saved["value"], tuple(saved["scores"]), tuple(saved["weights"]), tuple(saved["soft"]),
                   saved.get("extra", {}))


@dataclass(frozen=True)
class Verdict:
    point: float  # the candidate's metric
    lower: float  # its lower confidence bound relative to dense: what the acceptance rule compares
    drop: float  # dense - candidate, on the same examples
    se: float  # standard error of the drop (paired); 0 without per-example scores
    signal: float | None  # mean paired drop of the soft signal (None without it)


def acceptance_threshold(dense: float, tolerance: float, absolute: bool = False) -> float:
    """The lowest acceptable metric: dense - tol (absolute) or dense - tol * |dense| (relative).

    |dense| rather than dense keeps "higher is better" right for metrics that are negative
    (e.g. a negated perplexity): (1 - tol) x dense would then lie above dense.
    """
    return dense - tolerance if absolute else dense - tolerance * abs(dense)


def is_acceptable(metric: float, threshold: float) -> bool:
    # a hair of slack so a candidate that scores exactly the threshold is not lost to rounding
    return metric >= threshold - 1e-12


def z_for(confidence: float) -> float:
    """One-sided normal quantile: 0.9 -> 1.28; 0.5 -> 0 (the point estimate)."""
    return NormalDist().inv_cdf(confidence) if confidence > 0.5 else 0.0


def paired_drop(dense: Measurement, candidate: Measurement) -> tuple[float, float]:
    """(drop, standard error) of dense - candidate over the same examples, examples as clusters.

    The drop is a ratio of weighted sums; its variance comes from the delta method with each
    example as one cluster (its tokens are not independent draws).
    """
    if len(dense.scores) != len(candidate.scores) or not dense.paired:
        return dense.value - candidate.value, 0.0
    weights = dense.weights or (1.0,) * len(dense.scores)
    total = sum(weights)
    diffs = [w * (d - c) for w, d, c in zip(weights, dense.scores, candidate.scores)]
    drop = sum(diffs) / total
    m = len(diffs)
    if m < 2:
        return drop, 0.0
    var = m / (m - 1) * sum((x - drop * w) ** 2 for x, w in zip(diffs, weights)) / total**2
    return drop, math.sqrt(var)


def judge(dense: Measurement, candidate: Measurement, confidence: float) -> Verdict:
    """The candidate's metric, and the lower bound the acceptance rule holds it to."""
    drop, se = paired_drop(dense, candidate)
    signal = None
    if dense.soft and len(dense.soft) == len(candidate.soft):
        signal = sum(d - c for d, c in zip(dense.soft, candidate.soft)) / len(dense.soft)
    return Verdict(point=candidate.value, lower=dense.value - (drop + z_for(confidence) * se), drop=drop, se=se,
                   signal=signal)
