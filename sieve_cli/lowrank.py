"""The low-rank linear module and module swapping (the rank arithmetic is in `ranks.py`).

A pruned matrix W (H x D) becomes y = B (A x) + bias with A: R x D and B: H x R, which
costs R (H + D) parameters, so keeping a fraction p of the matrix allows
R = floor(p H D / (H + D)). At p >= 1 the matrix stays dense.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from .matrices import is_conv1d
from .ranks import fraction_for_rank, lowrank_params, rank_for_fraction  # noqa: F401 - re-exported


class LowRankLinear(nn.Module):
    """y = B (A x) + bias: two thin linear maps replacing one H x D matrix."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.B = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def bias_of(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)


def swap_modules(model: nn.Module, replacements: Mapping[str, nn.Module]) -> Callable[[], None]:
    """Put each replacement at its module name in `model`; return a function that undoes it.

    Used by search to try many plans on one in-memory model, and by apply to build one.
    """
    originals = {}
    for name, new in replacements.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        originals[name] = getattr(parent, child)
        setattr(parent, child, new)

    def restore() -> None:
        for name, old in originals.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, old)

    return restore


__all__ = [
    "LowRankLinear",
    "bias_of",
    "fraction_for_rank",
    "is_conv1d",
    "lowrank_params",
    "rank_for_fraction",
    "swap_modules",
]
