"""The prunable matrices of a loaded model, found through the architecture table.

This is the one place that knows GPT-2's Conv1D stores its weight transposed
(in x out): everything else sees every matrix as W of shape H x D (out x in).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from .archs import arch_for
from .errors import UnsupportedArchitectureError
from .ranks import fraction_for_rank, lowrank_params, rank_for_fraction


@dataclass(frozen=True)
class Matrix:
    name: str  # full module name in the model, e.g. "model.layers.0.self_attn.q_proj"
    block: int
    kind: str  # q, k, v, qkv, o, gate, up, gate_up, down, fc1, fc2
    group: str  # attention | mlp
    site: str  # input site, shared by matrices that read the same tensor: "3.attn_in"
    out_features: int  # H
    in_features: int  # D
    transposed: bool  # Conv1D: weight stored as D x H
    bias: bool

    @property
    def params(self) -> int:
        """Weight parameters (biases are not counted: they are never pruned)."""
        return self.out_features * self.in_features

    # the interface every search target has (a WidthUnit has the same three, with widths)
    level_key = "rank"

    def level_for(self, kept: float) -> int | None:
        """The rank that keeps at most `kept` of the matrix; None: stays dense."""
        return rank_for_fraction(kept, self.out_features, self.in_features)

    def size_at(self, rank: int | None) -> int:
        return lowrank_params(rank, self.out_features, self.in_features)

    def kept_at(self, rank: int | None) -> float:
        return fraction_for_rank(rank, self.out_features, self.in_features)

    def to_dict(self) -> dict:
        return {**asdict(self), "params": self.params}

    @classmethod
    def from_dict(cls, data: dict) -> "Matrix":
        """The record as discover wrote it in matrices.json (`params` is derived, not stored back)."""
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D; checked by name so no import of GPT-2 code is needed.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_of(module: nn.Module) -> torch.Tensor:
    """The weight as H x D (out x in), whatever the module stores."""
    return module.weight.T if is_conv1d(module) else module.weight


def get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no module {path!r}: its layout differs from the table "
            f"entry for {getattr(model.config, 'model_type', '?')!r}"
        ) from None


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    spec = arch_for(model.config.model_type)
    return spec.blocks, get_module(model, spec.blocks)


def find_matrices(model: nn.Module) -> list[Matrix]:
    """Every prunable matrix, block by block in the table's order."""
    spec = arch_for(model.config.model_type)
    prefix, blocks = decoder_blocks(model)
    found = []
    for index, block in enumerate(blocks):
        for mspec in spec.matrices:
            module = get_module(block, mspec.path)
            if not is_linear_like(module):
                raise UnsupportedArchitectureError(
                    f"{prefix}.{index}.{mspec.path} is a {type(module).__name__}, not a linear layer"
                )
            out_features, in_features = weight_of(module).shape
            found.append(
                Matrix(
                    name=f"{prefix}.{index}.{mspec.path}",
                    block=index,
                    kind=mspec.kind,
                    group=mspec.group,
                    site=f"{index}.{mspec.site}",
                    out_features=int(out_features),
                    in_features=int(in_features),
                    transposed=is_conv1d(module),
                    bias=getattr(module, "bias", None) is not None,
                )
            )
    return found


def sites_of(matrices: list[Matrix]) -> dict[str, list[Matrix]]:
    """Matrices grouped by input site, in first-seen order."""
    sites: dict[str, list[Matrix]] = {}
    for m in matrices:
        sites.setdefault(m.site, []).append(m)
    return sites
