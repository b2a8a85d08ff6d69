"""A set of fitted factors, per matrix, from which any rank's (B, A) pair is read.

Closed-form methods (output, svd, pca) store one full ordered basis per matrix: B_full
(H x K) and A_full (K x D) such that rank R is the first R columns of B_full and rows of
A_full. The learned method stores separately trained pairs per rank. Saved as one
safetensors file: `<name>.B` / `<name>.A` for full bases, `<name>@<rank>.B` / `.A` for pairs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import InputError

Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class FactorSet:
    method: str
    full: dict[str, Pair] = field(default_factory=dict)  # name -> (B_full H x K, A_full K x D)
    fixed: dict[str, dict[int, Pair]] = field(default_factory=dict)  # name -> rank -> (B, A)

    def names(self) -> list[str]:
        return list(dict.fromkeys([*self.full, *self.fixed]))

    def max_rank(self, name: str) -> int:
        if name in self.full:
            return self.full[name][0].shape[1]
        return max(self.fixed[name])

    def ranks(self, name: str) -> list[int] | None:
        """The ranks available for `name`: None means any rank up to max_rank."""
        return None if name in self.full else sorted(self.fixed[name])

    def pair(self, name: str, rank: int) -> Pair:
        """(B: H x rank, A: rank x D) for matrix `name`."""
        if name in self.full:
            B, A = self.full[name]
            if rank > B.shape[1]:
                raise InputError(f"rank {rank} exceeds the fitted basis of {name} ({B.shape[1]})")
            return B[:, :rank], A[:rank]
        try:
            return self.fixed[name][rank]
        except KeyError:
            available = sorted(self.fixed.get(name, {}))
            raise InputError(
                f"the {self.method} fit has no factors of rank {rank} for {name} (has {available}); "
                f"refit with the levels you search, or use --method output"
            ) from None

    def save(self, path: Path) -> None:
        tensors, ranks = {}, {}
        for name, (B, A) in self.full.items():
            tensors[f"{name}.B"], tensors[f"{name}.A"] = B.contiguous(), A.contiguous()
        for name, pairs in self.fixed.items():
            ranks[name] = sorted(pairs)
            for rank, (B, A) in pairs.items():
                tensors[f"{name}@{rank}.B"], tensors[f"{name}@{rank}.A"] = B.contiguous(), A.contiguous()
        save_file(tensors, str(path), metadata={"method": self.method, "fixed_ranks": json.dumps(ranks)})

    @classmethod
    def load(cls, path: Path) -> "FactorSet":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
        result = cls(method=metadata.get("method", "unknown"))
        for key, tensor in tensors.items():
            stem, part = key.rsplit(".", 1)
            if "@" in stem:
                name, rank = stem.rsplit("@", 1)
                pair = result.fixed.setdefault(name, {}).setdefault(int(rank), [None, None])
            else:
                pair = result.full.setdefault(stem, [None, None])
            pair[0 if part == "B" else 1] = tensor
        result.full = {k: tuple(v) for k, v in result.full.items()}
        result.fixed = {k: {r: tuple(p) for r, p in v.items()} for k, v in result.fixed.items()}
        return result
