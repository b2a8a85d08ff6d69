"""Width units of a model and the narrower modules a width plan swaps in (the math is in `width.py`).

A width unit is one module whose inner width can be cut by whole units, found through the
architecture table's `widths` entries: an MLP (its intermediate neurons) or an attention module
(its key/value groups, each a KV head with its query heads). Cutting unit j of a unit deletes
`per` rows of every row matrix (gate/up, q/k/v; a stacked gate_up loses the row in both halves)
and `unit_size` columns of the out matrix (down, o), which the width fit refits. A unit at width
0 is removed: an MLP then adds only its down bias; an attention module is skipped (its output is
zero), so a block with both at 0 is gone and the residual passes through.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
from torch import nn

from .archs import arch_for
from .errors import InputError, UnsupportedArchitectureError
from .matrices import Matrix, is_conv1d, weight_of


@dataclass(frozen=True)
class WidthUnit:
    name: str  # "model.layers.3.mlp", "model.layers.3.self_attn"
    block: int
    kind: str  # mlp | attention
    units: int  # neurons or KV groups
    unit_size: int  # columns of `out` per unit
    rows: tuple[tuple[str, int], ...]  # (row matrix name, rows per unit)
    stacked: tuple[str, ...]  # row matrices made of two stacked halves (gate_up)
    out: str  # the matrix whose columns are cut and refit
    module: str  # the module skipped at width 0 ("" when none needs to be: an MLP)
    per_unit: int  # weight parameters one unit costs

    @property
    def params(self) -> int:
        return self.units * self.per_unit

    @property
    def group(self) -> str:
        return self.kind

    # the interface every search target has (Matrix has the same three, with ranks)
    def level_for(self, kept: float) -> int | None:
        """The width that keeps at most `kept` of the unit's parameters; None: stays whole."""
        return None if kept >= 1.0 else max(0, math.floor(kept * self.units + 1e-9))

    def size_at(self, width: int | None) -> int:
        return self.params if width is None else width * self.per_unit

    def kept_at(self, width: int | None) -> float:
        return 1.0 if width is None else width / self.units

    level_key = "width"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "WidthUnit":
        return cls(**{**data, "rows": tuple(tuple(r) for r in data["rows"]), "stacked": tuple(data["stacked"])})


def head_layout(config: Any) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) from a transformers config or its dict."""
    get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
    heads = get("num_attention_heads") or get("n_head")
    kv = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or get("hidden_size", get("n_embd")) // heads
    return int(heads), int(kv), int(head_dim)


def width_units(matrices: list[Matrix], model_type: str, config: Any) -> list[WidthUnit]:
    """Every width unit of the model, block by block, from its matrices and config."""
    spec = arch_for(model_type)
    by_block: dict[int, dict[str, Matrix]] = {}
    for m in matrices:
        by_block.setdefault(m.block, {})[m.kind] = m
    found = []
    for block, kinds in sorted(by_block.items()):
        for w in spec.widths:
            out = kinds[w.out]
            rows = [kinds[k] for k in w.rows]
            if w.unit == "neuron":
                units, size = out.in_features, 1
                per = {r.name: 1 for r in rows}
            else:
                heads, kv, head_dim = head_layout(config)
                units, size = kv, heads // kv * head_dim
                per = {r.name: (size if r.kind == "q" else head_dim) for r in rows}
            if out.in_features != units * size:
                raise UnsupportedArchitectureError(f"{out.name} reads {out.in_features} features, not {units} x {size}: "
                                                   f"its {w.unit}s cannot be cut")
            stacked = tuple(r.name for r in rows if r.kind in w.stacked)
            per_unit = sum(per[r.name] * r.in_features * (2 if r.name in stacked else 1) for r in rows) \
                + out.out_features * size
            prefix = out.name[: out.name.index(f".{block}.") + len(str(block)) + 1]
            found.append(WidthUnit(name=f"{prefix}.{w.module or w.kind}", block=block, kind=w.kind, units=units,
                                   unit_size=size, rows=tuple((r.name, per[r.name]) for r in rows), stacked=stacked,
                                   out=out.name, module=f"{prefix}.{w.module}" if w.skip else "",
                                   per_unit=per_unit))
    return found


def unit_indices(units: torch.Tensor, per: int, total_units: int, stacked: bool) -> torch.Tensor:
    idx = (units[:, None] * per + torch.arange(per)[None, :]).reshape(-1)
    return torch.cat([idx, idx + total_units * per]) if stacked else idx


class SkippedAttention(nn.Module):
    """An attention module cut to no heads: its output is zero, so the residual passes through."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


def linear_like(original: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A module of the original's class (Linear or GPT-2's Conv1D) computing `weight` (H x D) + bias."""
    out_features, in_features = weight.shape
    dtype, device = weight_of(original).dtype, weight_of(original).device
    # built on meta (no random init of what is replaced below); a removed block's modules have 0 rows
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
        module = (type(original)(out_features, in_features) if is_conv1d(original)
                  else nn.Linear(in_features, out_features, bias=bias is not None))
    module.weight = nn.Parameter((weight.T if is_conv1d(original) else weight).to(dtype=dtype, device=device)
                                 .contiguous())
    if bias is not None:
        module.bias = nn.Parameter(bias.detach().clone().to(device))
    elif is_conv1d(original):
        module.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
    return module


def narrowed_modules(model: nn.Module, unit: WidthUnit, width: int, basis) -> dict[str, nn.Module]:
    """The modules that put `unit` at `width` in `model` ({module name: module}); `basis` its WidthBasis."""
    if not 0 <= width <= unit.units:
        raise InputError(f"width {width} of {unit.name} is outside 0..{unit.units}")
    if width == 0 and unit.module:
        return {unit.module: SkippedAttention()}
    kept = basis.order[:width]
    replacements = {}
    for name, per in unit.rows:
        module = model.get_submodule(name)
        idx = unit_indices(kept, per, unit.units, name in unit.stacked).to(weight_of(module).device)
        bias = getattr(module, "bias", None)
        replacements[name] = linear_like(module, weight_of(module).detach()[idx],
                                         None if bias is None else bias.detach()[idx])
    out = model.get_submodule(unit.out)
    W = weight_of(out)
    refit = basis.refit(width).to(W.device)
    if refit.shape != (W.shape[0], width * unit.unit_size):
        raise InputError(f"the width fit of {unit.name} does not match the model's {unit.out} "
                         f"({tuple(refit.shape)} vs {W.shape[0]} x {width * unit.unit_size}): rerun `sieve fit --method width --force`")
    bias = getattr(out, "bias", None)
    replacements[unit.out] = linear_like(out, refit, None if bias is None else bias.detach())
    return replacements


def shape_of(module: nn.Module) -> dict:
    """How sieve.json records a swapped-in module so a loader can build its empty shell."""
    if isinstance(module, SkippedAttention):
        return {"type": "skip"}
    out_features, in_features = weight_of(module).shape
    return {"type": "conv1d" if is_conv1d(module) else "linear", "in_features": int(in_features),
            "out_features": int(out_features), "bias": getattr(module, "bias", None) is not None}


__all__ = ["SkippedAttention", "WidthUnit", "head_layout", "narrowed_modules", "shape_of", "width_units"]
