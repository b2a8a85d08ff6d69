"""The plan: a rank per prunable matrix, what `search` writes and `apply` executes.

`Plan` is the one type every stage uses: `Plan.build` is its only writer (search and the
Python API), `Plan.load` / `Plan.parse` its only reader (apply, the pruned-model loader,
the report, the CLI tables). The file format is in docs/internals.md ("Plan"); a plan that
does not follow it gives one line naming the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import InputError
from .files import read_json, write_json_atomic
from .options import FIT_METHODS

PLAN_SCHEMA = 1
KIND_ORDER = ("q", "k", "v", "qkv", "o", "attention", "gate", "up", "gate_up", "down", "fc1", "fc2", "mlp")

Ranks = dict[str, "int | None"]


@dataclass(frozen=True)
class Plan:
    """A parsed, checked plan; `data` is its JSON form (what plan.json and sieve.json hold)."""

    data: dict

    # ---- the writer -------------------------------------------------------------------------
    @classmethod
    def build(cls, *, strategy: str, method: str, tolerance: float, absolute: bool, matrices: Iterable[Any],
              ranks: Mapping[str, int | None], model_total: int, metric: str, dense: float, plan_metric: float,
              search: dict | None = None) -> "Plan":
        """The plan for `ranks` over `matrices` (records with name, kind, block, out/in features, params);
        `search` holds how it was found (apply ignores it)."""
        entries = {}
        for m in matrices:  # Matrix records (a rank each) or WidthUnits (a width each)
            level = ranks[m.name]
            entries[m.name] = {"kind": m.kind, "block": m.block, "kept": m.kept_at(level), m.level_key: level,
                               "params_before": m.params, "params_after": m.size_at(level)}
            if m.level_key == "width":
                entries[m.name]["units"] = m.units
        before = sum(e["params_before"] for e in entries.values())
        after = sum(e["params_after"] for e in entries.values())
        model_after = model_total - (before - after)
        return cls({
            "schema": PLAN_SCHEMA, "strategy": strategy, "method": method,
            "tolerance": tolerance, "absolute": absolute,
            "matrices": entries,
            "params": {"prunable_before": before, "prunable_after": after, "model_before": model_total,
                       "model_after": model_after, "removed_fraction_prunable": 1 - after / before if before else 0.0,
                       "removed_fraction_model": 1 - model_after / model_total if model_total else 0.0},
            "metric": {"name": metric, "split": "search", "dense": dense, "plan": plan_metric},
            "search": dict(search or {}),
        })

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.data)

    # ---- the reader -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path, rebuild: str = "sieve search") -> "Plan":
        if not Path(path).is_file():
            raise InputError(f"plan {path} does not exist; run `{rebuild}` to write it")
        return cls.parse(read_json(path, rebuild=rebuild), source=str(path), rebuild=rebuild)

    @classmethod
    def parse(cls, data: Any, source: str = "the plan", rebuild: str = "sieve search") -> "Plan":
        """Check what executing a plan relies on: a method and a rank (int >= 0, or null) per matrix.

        A `true` rank is refused, not read as 1. The descriptive fields (kind, block, kept) are
        what the tables and the report read; they are checked by `describable()`.
        """
        if not isinstance(data, dict) or not isinstance(data.get("matrices"), dict) or "method" not in data:
            raise InputError(f"{source} is not a sieve plan (it needs `method` and `matrices`); run `{rebuild}`")
        if data["method"] not in FIT_METHODS:  # it names a folder of the workspace: never a path
            raise InputError(f"{source}: method {data['method']!r} is not a fit method ({', '.join(FIT_METHODS)}); "
                             f"run `{rebuild}`")
        key = "width" if data["method"] == "width" else "rank"
        for name, entry in data["matrices"].items():
            rank = entry.get(key, "missing") if isinstance(entry, dict) else "missing"
            if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
                raise InputError(f"{source}: {key} of {name} must be a non-negative integer or null, got {rank!r}")
        return cls(data)

    def describable(self, source: str = "the plan") -> "Plan":
        """The plan, after checking the fields the tables read (kind, block, kept per matrix)."""
        for name, entry in self.matrices.items():
            if not isinstance(entry.get("kind"), str) or not isinstance(entry.get("block"), int) \
                    or not _is_number(entry.get("kept")):
                raise InputError(f"{source}: entry of {name} needs kind, block and kept; rerun `sieve search`")
        return self

    def __getitem__(self, key: str) -> Any:  # read-only access to the JSON form: plan["params"]
        return self.data[key]

    @property
    def method(self) -> str:
        return self.data["method"]

    @property
    def strategy(self) -> str:
        return self.data.get("strategy", "?")

    @property
    def params(self) -> dict:
        return self.data.get("params", {})

    @property
    def metric(self) -> dict:
        return self.data.get("metric", {})

    @property
    def matrices(self) -> dict[str, dict]:
        return self.data["matrices"]

    @property
    def level_key(self) -> str:
        """What each entry's level is: a matrix's rank, or (a width plan) a unit's width."""
        return "width" if self.method == "width" else "rank"

    def ranks(self) -> Ranks:
        """name -> rank, or width for a width plan (None: stays dense)."""
        return {name: entry[self.level_key] for name, entry in self.matrices.items()}

    def kept(self) -> dict[str, float]:
        return {name: float(entry["kept"]) for name, entry in self.matrices.items()}

    def checked_against(self, matrices: Mapping[str, Any], source: str) -> Ranks:
        """The ranks, after checking that every planned matrix is a prunable matrix of the model."""
        for name in self.matrices:
            if name not in matrices:
                raise InputError(f"{source} names {name}, which is not a prunable matrix of the workspace's model")
        return self.ranks()

    def kinds(self) -> list[str]:
        """The matrix kinds in table order (q, k, v, o, gate, up, down, ...)."""
        kinds = {m["kind"] for m in self.matrices.values()}
        return sorted(kinds, key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER), k))

    def kept_by_block(self) -> dict[int, dict[str, float]]:
        """{block: {kind: kept fraction}}: the bottleneck view."""
        blocks: dict[int, dict[str, float]] = {}
        for m in self.matrices.values():
            blocks.setdefault(int(m["block"]), {})[m["kind"]] = min(1.0, float(m["kept"]))
        return dict(sorted(blocks.items()))

    def params_by_kind(self) -> dict[str, tuple[int, int]]:
        """{kind: (parameters kept, parameters before)}."""
        totals = {k: [0, 0] for k in self.kinds()}
        for m in self.matrices.values():
            totals[m["kind"]][0] += m["params_after"]
            totals[m["kind"]][1] += m["params_before"]
        return {k: (a, b) for k, (a, b) in totals.items()}


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
