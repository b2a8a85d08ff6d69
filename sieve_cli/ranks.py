"""Rank arithmetic, pure: kept fraction <-> rank, and the parameters a rank keeps.

For a matrix of H x D, rank R costs R (H + D) parameters: the kept fraction is
p = R (H + D) / (H D) and R = floor(p H D / (H + D)); at p >= 1 the matrix stays dense.
"""

from __future__ import annotations

import math


def rank_for_fraction(p: float, out_features: int, in_features: int) -> int | None:
    """The rank that keeps at most a fraction `p` of an H x D matrix; None means stay dense."""
    if p >= 1.0:
        return None
    if p < 0:
        raise ValueError(f"kept fraction must be >= 0, got {p}")
    h, d = out_features, in_features
    return max(0, math.floor(p * h * d / (h + d) + 1e-9))


def fraction_for_rank(rank: int | None, out_features: int, in_features: int) -> float:
    """The fraction of the dense matrix's parameters that rank `rank` keeps (1.0 for dense)."""
    if rank is None:
        return 1.0
    return rank * (out_features + in_features) / (out_features * in_features)


def lowrank_params(rank: int | None, out_features: int, in_features: int) -> int:
    """Weight parameters of the matrix at `rank` (dense when None); biases not counted."""
    if rank is None:
        return out_features * in_features
    return rank * (out_features + in_features)
