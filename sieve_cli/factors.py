"""A set of fitted factors, per matrix, from which any rank's (B, A) pair is read.

Closed-form methods (output, svd, pca) give one ordered basis per matrix: B_full (H x K) and
A_full (K x D) such that rank R is the first R columns of B_full and rows of A_full. The
learned method gives separately trained pairs per rank.

On disk (`FactorSet.save(folder / "factors.json")`): the index `factors.json` (method, dtype,
per matrix its shard file, shape, stored rank limit and, for learned, its ranks) and one
safetensors shard per decoder block, `factors-block-007.safetensors`, holding `<name>.B` /
`<name>.A` for bases and `<name>@<rank>.B` / `.A` for pairs. A basis is stored only up to
the break-even rank floor(HD / (H + D)): above it a factored matrix has more parameters
than the dense one, so no plan uses it. `FactorSet.load` returns a `StoredFactors` that
reads the index only and opens a shard when one of its matrices is first asked for.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import InputError
from .files import copy_file, save_safetensors, sha256_file, write_text_atomic
from .narrowing import WidthUnit
from .width import WidthBasis

Pair = tuple[torch.Tensor, torch.Tensor]

INDEX_FORMAT = 2  # 1 was the single float32 factors.safetensors holding full bases
LEGACY_FILE = "factors.safetensors"


def break_even_rank(out_features: int, in_features: int) -> int:
    """The largest rank whose factors R (H + D) are not larger than the dense H x D matrix."""
    return out_features * in_features // (out_features + in_features)


def shard_name(block: int | None) -> str:
    return "factors-other.safetensors" if block is None else f"factors-block-{block:03d}.safetensors"


@dataclass
class FactorSet:
    """Factors held in memory: what fit builds, and the interface search and apply read."""

    method: str
    full: dict[str, Pair] = field(default_factory=dict)  # name -> (B_full H x K, A_full K x D)
    fixed: dict[str, dict[int, Pair]] = field(default_factory=dict)  # name -> rank -> (B, A)
    blocks: dict[str, int] = field(default_factory=dict)  # name -> decoder block (its shard on disk)
    # method "width": unit name -> (its WidthUnit, its WidthBasis: every width's kept units and refit)
    widths: dict[str, tuple] = field(default_factory=dict)

    def names(self) -> list[str]:
        return list(dict.fromkeys([*self.full, *self.fixed, *self.widths]))

    def width_units(self) -> list:
        """The width units this (width) fit covers, in fit order."""
        return [unit for unit, _ in self.widths.values()]

    def basis(self, name: str):
        """The WidthBasis of width unit `name`."""
        if name not in self.widths:
            raise InputError(f"the {self.method} fit has no width fit for {name}; rerun `sieve fit --method width`")
        return self.widths[name][1]

    def max_rank(self, name: str) -> int:
        if name in self.widths:
            return self.widths[name][0].units
        if name in self.full:
            return self.full[name][0].shape[1]
        return max(self.fixed[name])

    def ranks(self, name: str) -> list[int] | None:
        """The ranks available for `name`: None means any rank up to max_rank."""
        return None if name in self.full or name in self.widths else sorted(self.fixed[name])

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

    def save(self, index: Path, dtype: torch.dtype | None = None, lean: bool = True) -> list[Path]:
        """Write the index at `index` and the block shards beside it; returns every file written.

        `dtype` converts the factors (None keeps theirs); `lean` cuts each basis at the
        break-even rank (False keeps the full basis, for inspection).
        """
        index = Path(index)
        shards: dict[str, dict[str, torch.Tensor]] = {}
        entries = {}
        for name in self.names():
            file = shard_name(self.blocks.get(name))
            tensors = shards.setdefault(file, {})
            entries[name] = self._store_matrix(name, tensors, dtype, lean) | {"file": file}
        written, hashes = [], {}
        for file, tensors in shards.items():
            save_safetensors(tensors, index.parent / file, metadata={"method": self.method})
            written.append(index.parent / file)
            hashes[file] = sha256_file(index.parent / file)
        stored = next((t.dtype for ts in shards.values() for t in ts.values() if t.is_floating_point()),
                      dtype or torch.float32)
        body = {"format": INDEX_FORMAT, "method": self.method, "dtype": str(stored).removeprefix("torch."),
                "lean": lean, "matrices": entries, "shards": hashes}
        write_text_atomic(index, json.dumps(body, indent=1))
        return [index, *written]

    def _store_matrix(self, name: str, tensors: dict, dtype: torch.dtype | None, lean: bool) -> dict:
        def stored(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to("cpu", dtype or t.dtype).contiguous()

        if name in self.widths:
            unit, basis = self.widths[name]
            exact = lambda t: t.detach().to("cpu", torch.float32).contiguous()  # noqa: E731 - refit needs >= float32
            tensors[f"{name}.order"] = basis.order.to("cpu", torch.int64).contiguous()
            tensors[f"{name}.M"], tensors[f"{name}.Linv"] = exact(basis.M), exact(basis.Linv)
            return {"shape": list(basis.M.shape), "rank_limit": unit.units, "ranks": None, "unit": unit.to_dict()}
        if name in self.full:
            B, A = self.full[name]
            (H, K), D = B.shape, A.shape[1]
            limit = min(K, break_even_rank(H, D)) if lean else K
            tensors[f"{name}.B"], tensors[f"{name}.A"] = stored(B[:, :limit]), stored(A[:limit])
            return {"shape": [H, D], "rank_limit": limit, "ranks": None}
        pairs = self.fixed[name]
        for rank, (B, A) in pairs.items():
            tensors[f"{name}@{rank}.B"], tensors[f"{name}@{rank}.A"] = stored(B), stored(A)
        B0, A0 = next(iter(pairs.values()))
        return {"shape": [B0.shape[0], A0.shape[1]], "rank_limit": max(pairs), "ranks": sorted(pairs)}

    @classmethod
    def load(cls, index: Path) -> "StoredFactors":
        return StoredFactors(index)


class StoredFactors(FactorSet):
    """A saved FactorSet read lazily: the index at once, a matrix's tensors when first asked for.

    Each matrix's stored basis (or trained pairs) is read from its block's shard on first use
    and kept, on `device` in `dtype` (see `keep_on`), so every later `pair` is a slice of
    tensors already in place. `cache=False` re-reads the shard on every call instead.
    """

    def __init__(self, index: Path, cache: bool = True) -> None:
        index = Path(index)
        body = _read_index(index)
        super().__init__(method=body["method"])
        self.folder, self.index, self.cache = index.parent, body["matrices"], cache
        self.hashes: dict[str, str] = body.get("shards", {})  # shard file -> sha256, checked on first open
        self.stored_dtype = getattr(torch, body["dtype"])
        self.device: torch.device = torch.device("cpu")
        self.dtype: torch.dtype | None = None  # None: as stored
        self.blocks = {}
        self._held: dict[str, dict[str, torch.Tensor]] = {}  # name -> tensor key -> tensor
        self._opened: set[str] = set()  # shard files read so far

    def keep_on(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "StoredFactors":
        """Hold the factors on `device` (in `dtype`, default as stored) from now on; returns self.

        Search calls this once with its model's device and dtype: each matrix's factors then
        cross to the device once, and every candidate slices them there.
        """
        device = torch.device(device)
        if device != self.device or dtype != self.dtype:
            self._held.clear()
        self.device, self.dtype = device, dtype
        return self

    def names(self) -> list[str]:
        return list(self.index)

    def width_units(self) -> list:
        return [WidthUnit.from_dict(e["unit"]) for e in self.index.values() if "unit" in e]

    def basis(self, name: str):
        entry = self._entry(name)
        if "unit" not in entry:
            raise InputError(f"the {self.method} fit has no width fit for {name}; rerun `sieve fit --method width`")
        order, M, Linv = self._tensors(name, (f"{name}.order", f"{name}.M", f"{name}.Linv"))
        return WidthBasis(order=order.cpu(), M=M, Linv=Linv, errors=torch.empty(0), unit_size=entry["unit"]["unit_size"])

    def max_rank(self, name: str) -> int:
        return self._entry(name)["rank_limit"]

    def ranks(self, name: str) -> list[int] | None:
        return self._entry(name)["ranks"]

    def shape(self, name: str) -> tuple[int, int]:
        H, D = self._entry(name)["shape"]
        return H, D

    def pair(self, name: str, rank: int) -> Pair:
        entry = self._entry(name)
        if entry["ranks"] is None:
            if not 0 <= rank <= entry["rank_limit"]:
                raise InputError(
                    f"rank {rank} exceeds the stored basis of {name} ({entry['rank_limit']}, its break-even "
                    f"rank: above it the factors are larger than the matrix)"
                )
            B, A = self._tensors(name, (f"{name}.B", f"{name}.A"))
            return B[:, :rank], A[:rank]
        if rank not in entry["ranks"]:
            raise InputError(
                f"the {self.method} fit has no factors of rank {rank} for {name} (has {entry['ranks']}); "
                f"refit with the levels you search, or use --method output"
            )
        return self._tensors(name, (f"{name}@{rank}.B", f"{name}@{rank}.A"))

    def save(self, index: Path, dtype: torch.dtype | None = None, lean: bool = True) -> list[Path]:
        """Copy this set's shards beside `index` and write its index there; returns every file written.

        Nothing is loaded: the block-wise fit's per-block shards become the fit's files this way,
        so its memory never holds every block's factors at once. The factors stay as stored (lean,
        in their dtype): `dtype` and `lean` must not ask for anything else.
        """
        if (dtype is not None and dtype != self.stored_dtype) or not lean:
            raise ValueError("stored factors are saved as they are stored")
        index = Path(index)
        written = []
        for file in sorted({entry["file"] for entry in self.index.values()}):
            target = index.parent / file
            if (self.folder / file).resolve() != target.resolve():
                copy_file(self.folder / file, target)
            written.append(target)
        body = {"format": INDEX_FORMAT, "method": self.method, "dtype": str(self.stored_dtype).removeprefix("torch."),
                "lean": True, "matrices": self.index, "shards": self.hashes}
        write_text_atomic(index, json.dumps(body, indent=1))
        return [index, *written]

    def load_all(self) -> FactorSet:
        """Every matrix in memory as a plain FactorSet (tests, small models)."""
        result = FactorSet(self.method)
        for name, entry in self.index.items():
            if "unit" in entry:
                result.widths[name] = (WidthUnit.from_dict(entry["unit"]), self.basis(name))
            elif entry["ranks"] is None:
                result.full[name] = self.pair(name, entry["rank_limit"])
            else:
                result.fixed[name] = {r: self.pair(name, r) for r in entry["ranks"]}
        return result

    def files_read(self) -> set[str]:
        """The shard files this set has opened so far (for tests of the lazy loading)."""
        return set(self._opened)

    def _entry(self, name: str) -> dict:
        try:
            return self.index[name]
        except KeyError:
            raise InputError(f"the {self.method} fit has no factors for {name}; rerun `sieve fit` on this workspace's model") from None

    def _tensors(self, name: str, keys: Iterable[str]) -> tuple[torch.Tensor, ...]:
        held = self._held.get(name)
        if held is None:
            held = self._read_matrix(name)
            if self.cache:
                self._held[name] = held
        return tuple(held[k] for k in keys)

    def _read_matrix(self, name: str) -> dict[str, torch.Tensor]:
        """Only this matrix's tensors from its shard (safetensors reads just those bytes)."""
        shard = self.index[name]["file"]
        if Path(shard).name != shard or not shard.endswith(".safetensors"):  # the index names files beside it, nothing else
            raise InputError(f"factor index {self.folder} names {shard!r} as a shard; rerun `sieve fit --force`")
        file = self.folder / shard
        if not file.exists():
            raise InputError(f"factor shard {file} is missing; rerun `sieve fit -w WS --method {self.method} --force`")
        if file.name not in self._opened and file.name in self.hashes and sha256_file(file) != self.hashes[file.name]:
            # a damaged shard would otherwise give a model with other weights and exit 0
            raise InputError(f"factor shard {file} does not match the hash its fit recorded (damaged or replaced); "
                             f"rerun `sieve fit -w WS --method {self.method} --force`")
        self._opened.add(file.name)
        width = "unit" in self.index[name]
        with safe_open(str(file), framework="pt") as f:
            return {k: self._placed(f.get_tensor(k), width) for k in f.keys() if _owner(k) == name}

    def _placed(self, t: torch.Tensor, width: bool) -> torch.Tensor:
        """On the set's device; floats in its dtype, except a width refit's (kept in at least float32)."""
        if not t.is_floating_point():
            return t.to(self.device)
        dtype = self.dtype or self.stored_dtype
        return t.to(self.device, torch.float32 if width and torch.finfo(dtype).bits < 32 else dtype)


def _owner(key: str) -> str:
    """The matrix name of a tensor key: `<name>.B`, `<name>@<rank>.A`."""
    stem = key.rsplit(".", 1)[0]
    return stem.rsplit("@", 1)[0] if "@" in stem else stem


def _read_index(index: Path) -> dict:
    if not index.exists():
        if (index.parent / LEGACY_FILE).exists():
            raise InputError(
                f"{index.parent} holds factors in the old single-file format; refit with "
                f"`sieve fit --force` (lean per-block shards)"
            )
        raise InputError(f"no factor index at {index}; run `sieve fit`")
    body = json.loads(index.read_text())
    if body.get("format") != INDEX_FORMAT:
        raise InputError(f"{index} has factor format {body.get('format')}, not {INDEX_FORMAT}; refit with `sieve fit --force`")
    return body
