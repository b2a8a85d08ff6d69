"""Stage apply: execute a plan, writing the pruned model to a folder outside the workspace.

The plan (from `search`, or a file given with --plan) names a rank per matrix. Each planned
matrix is stored in one of three ways:
  factored  a LowRankLinear (A then B): fewer parameters, and faster where the rank is low;
  product   a dense matrix holding B A, for a rank so high that two thin matmuls run slower
            than one dense one (kept fraction above `dense_above`): the model still computes
            exactly the map search evaluated, at dense speed and dense size;
  dense     rank null in the plan: the original matrix, untouched.
Parameter counts are counted from the built model; `--dry-run` predicts them from the plan.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import InputError
from .lowrank import fraction_for_rank, lowrank_params, swap_modules
from .models import resolve_source, torch_dtype
from .pruned import (
    WEIGHTS,
    build_replacements,
    count_params,
    densify_in_place,
    is_pruned_folder,
    matrix_params,
    read_sieve_json,
    save_pruned,
)
from .workspace import Workspace, read_json, sha256_file, sha256_json, write_json_atomic

log = logging.getLogger(__name__)

STAGE = "apply"
RESULT = "result.json"

# Kept fraction above which a factored matrix runs slower than the dense one. Measured on
# SmolLM2's shapes (bench/pruned_speed.py, 1 CPU thread, dense time / factored time): at 0.85
# and above nearly every shape is slower factored (prefill 0.81-1.18x, decode 0.64-0.92x); at
# 0.8 prefill breaks even (0.90-1.32x); at 0.75 prefill is 1.25-1.34x faster and the whole
# model decodes 1.06x faster. `--speed-crossover` stores the dense product B A above it.
DENSE_ABOVE = 0.8


@dataclass(frozen=True)
class ApplyOptions:
    out: Path
    plan: Path | None = None  # default: the workspace's search/plan.json
    dtype: str = "float32"
    dry_run: bool = False
    # 1.0 (default) factors every planned matrix, so the model is as small as the plan says;
    # DENSE_ABOVE trades the size saving of barely-pruned matrices for dense speed.
    dense_above: float = 1.0

    def __post_init__(self) -> None:
        torch_dtype(self.dtype)
        if not 0.0 < self.dense_above <= 1.0:
            raise InputError(f"--dense-above must be in (0, 1], got {self.dense_above}; 1 factors every planned matrix")

    def recorded(self) -> dict:
        """The options that decide the output (a dry run writes nothing, so it is not one)."""
        options = asdict(self)
        options.pop("dry_run")
        options["out"] = str(resolved(self.out))
        options["plan"] = str(resolved(self.plan)) if self.plan else None
        return options


def resolved(path: Path | str) -> Path:
    return Path(path).expanduser().resolve()


# ---- pure: layout and predicted counts -------------------------------------------------------
def factored_above_crossover(ranks: dict[str, int | None], shapes: dict[str, tuple[int, int]], layout: dict[str, str]) -> int:
    """How many factored matrices keep so much that they run slower than dense (see DENSE_ABOVE)."""
    return sum(1 for name, kind in layout.items()
               if kind == "factored" and fraction_for_rank(ranks[name], *shapes[name]) > DENSE_ABOVE)


def storage_layout(ranks: dict[str, int | None], shapes: dict[str, tuple[int, int]], dense_above: float) -> dict[str, str]:
    """name -> "factored" | "product" | "dense" (see the module docstring)."""
    layout = {}
    for name, rank in ranks.items():
        h, d = shapes[name]
        if rank is None:
            layout[name] = "dense"
        elif dense_above < 1.0 and fraction_for_rank(rank, h, d) > dense_above:
            layout[name] = "product"
        else:
            layout[name] = "factored"
    return layout


def predicted_prunable_after(ranks, shapes, layout) -> int:
    return sum(
        lowrank_params(ranks[n], *shapes[n]) if layout[n] == "factored" else shapes[n][0] * shapes[n][1]
        for n in ranks
    )


# ---- inputs -------------------------------------------------------------------------------
def read_plan(ws: Workspace, options: ApplyOptions) -> tuple[dict, Path]:
    path = resolved(options.plan) if options.plan else ws.plan_json
    if not options.plan:
        ws.require("search")  # names the command that writes the plan
    elif not path.is_file():
        raise InputError(f"no plan file at {path}; pass the plan.json that `sieve search` wrote")
    plan = read_json(path)
    if not isinstance(plan, dict) or not isinstance(plan.get("matrices"), dict) or "method" not in plan:
        raise InputError(f"{path} is not a sieve plan (needs `method` and `matrices`); rerun `sieve search`")
    return plan, path


def plan_ranks_checked(plan: dict, shapes: dict[str, tuple[int, int]], plan_path: Path) -> dict[str, int | None]:
    ranks = {}
    for name, entry in plan["matrices"].items():
        if name not in shapes:
            raise InputError(f"{plan_path} names {name}, which is not a prunable matrix of the workspace's model")
        rank = entry.get("rank") if isinstance(entry, dict) else None
        if rank is not None and (not isinstance(rank, int) or rank < 0):
            raise InputError(f"{plan_path}: rank of {name} must be a non-negative integer or null, got {rank!r}")
        ranks[name] = rank
    return ranks


def base_folder(ws: Workspace) -> Path | None:
    source = resolve_source(ws.require("discover")["inputs"]["options"]["model"])
    # a .gguf file is the input itself: OUT may sit beside it, but never replace it
    return None if source.kind == "hub" else resolved(source.location)


def guard_out(out: Path, base: Path | None, force: bool, inputs_sha: str) -> None:
    """Never write into the input model's folder; never over other outputs without --force."""
    if base is not None and (out == base or base in out.parents):
        raise InputError(f"output {out} is inside the input model's folder {base}; choose another -o")
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} is a file; pass a folder with -o")
    if out.is_dir() and any(out.iterdir()) and not force and not made_from(out, inputs_sha):
        raise InputError(f"output folder {out} exists and is not empty; pass --force to replace it or choose another -o")


def made_from(out: Path, inputs_sha: str) -> bool:
    if not is_pruned_folder(out):
        return False
    return read_sieve_json(out).get("apply", {}).get("inputs_sha256") == inputs_sha


# ---- the stage ----------------------------------------------------------------------------
def run_apply(ws: Workspace, options: ApplyOptions, force: bool = False) -> dict:
    """Build the plan's pruned model and save it to `options.out`; returns the numbers.

    Re-running with unchanged inputs while OUT still holds the result does nothing.
    """
    discover = ws.require("discover")
    shapes = {m["name"]: (m["out_features"], m["in_features"]) for m in read_json(ws.matrices_json)["matrices"]}
    plan, plan_path = read_plan(ws, options)
    ranks = plan_ranks_checked(plan, shapes, plan_path)
    method = plan["method"]
    upstream = ws.upstream_hashes("discover", *([] if options.plan else ["search"]), ws.fit_stage(method))
    inputs = {"options": options.recorded(), "upstream": upstream, "plan_sha256": sha256_file(plan_path)}
    layout = storage_layout(ranks, shapes, options.dense_above)
    slow = factored_above_crossover(ranks, shapes, layout)
    if options.dry_run:
        return predict(read_json(ws.matrices_json), ranks, shapes, layout, options, plan) | {"factored_above_crossover": slow}

    out, inputs_sha = resolved(options.out), sha256_json(inputs)
    # `sieve run` (replace_stale) may replace a pruned model that this workspace wrote earlier
    ours = ws.replace_stale and (ws.read_manifest(STAGE) or {}).get("summary", {}).get("out") == str(out)
    guard_out(out, base_folder(ws), force or ours, inputs_sha)
    if not ws.begin(STAGE, inputs, force) and made_from(out, inputs_sha):
        log.info("apply is up to date: %s was built from the same plan and options", out)
        return {**read_json(ws.stage_dir(STAGE) / RESULT), "up_to_date": True}
    if discover["inputs"]["options"]["dtype"] != options.dtype:
        log.warning("search scored the model in %s; in %s the metric can differ slightly",
                    discover["inputs"]["options"]["dtype"], options.dtype)

    result = build_and_save(ws, ranks, layout, plan, method, options, out, inputs_sha) | {"factored_above_crossover": slow}
    result_path = ws.stage_dir(STAGE) / RESULT
    write_json_atomic(result_path, result)
    ws.finish(STAGE, inputs, [result_path], summary={k: result[k] for k in ("out", "params_after", "params_ratio", "file_bytes")})
    return result


def load_factors(ws: Workspace, method: str):
    from .fit import load_factors as load

    return load(ws, method)


def build_and_save(ws: Workspace, ranks, layout, plan, method, options: ApplyOptions, out: Path, inputs_sha: str) -> dict:
    from .discover import load_workspace_model

    model, tokenizer = load_workspace_model(ws, options.dtype, "cpu")
    names = list(ranks)
    params_before, prunable_before = count_params(model), matrix_params(model, names)
    factors = load_factors(ws, method)
    densify_in_place(model, {n: ranks[n] for n in names if layout[n] == "product"}, factors)
    swap_modules(model, build_replacements(model, {n: ranks[n] for n in names if layout[n] == "factored"}, factors))
    stored_dense = sorted(n for n in names if layout[n] == "product")
    extra = {"apply": {"dense_above": options.dense_above, "stored_as_product": stored_dense, "inputs_sha256": inputs_sha}}
    write_folder(out, lambda folder: save_pruned(model, folder, plan, ws.require("discover")["inputs"]["model"],
                                                 tokenizer, fit_method=method, extra=extra))
    params_after, prunable_after = count_params(model), matrix_params(model, names)
    file_bytes = (out / WEIGHTS).stat().st_size
    nbytes = torch_dtype(options.dtype).itemsize
    return numbers(params_before, params_after, prunable_before, prunable_after, file_bytes, nbytes, layout,
                   plan, options, out, predicted=False)


def write_folder(out: Path, write) -> None:
    """Write into a temporary sibling, then move it into place, so a crash leaves no half model."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if out.is_dir() and (is_pruned_folder(out) or not any(out.iterdir())):
            shutil.rmtree(out)  # our own earlier output, or empty: replace it whole
        if not out.exists():
            tmp.rename(out)
            return
        log.warning("writing into %s, which holds other files (--force); they are left in place", out)
        for item in tmp.iterdir():
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def predict(matrices_json: dict, ranks, shapes, layout, options: ApplyOptions, plan: dict) -> dict:
    """The numbers apply would print, from the plan and discover's counts, without loading anything."""
    prunable_before = sum(shapes[n][0] * shapes[n][1] for n in ranks)
    prunable_after = predicted_prunable_after(ranks, shapes, layout)
    params_before = matrices_json["total_params"]
    params_after = params_before - prunable_before + prunable_after
    nbytes = torch_dtype(options.dtype).itemsize
    return numbers(params_before, params_after, prunable_before, prunable_after, params_after * nbytes, nbytes,
                   layout, plan, options, resolved(options.out), predicted=True)


def numbers(params_before, params_after, prunable_before, prunable_after, file_bytes, nbytes, layout, plan,
            options: ApplyOptions, out: Path, predicted: bool) -> dict:
    counts = {kind: sum(1 for v in layout.values() if v == kind) for kind in ("factored", "product", "dense")}
    dense_bytes = params_before * nbytes
    return {
        "out": str(out),
        "dry_run": options.dry_run,
        "predicted": predicted,
        "method": plan["method"],
        "dtype": options.dtype,
        "dense_above": options.dense_above,
        "params_before": params_before,
        "params_after": params_after,
        "params_ratio": params_after / params_before,
        "removed_fraction_model": 1 - params_after / params_before,
        "prunable_before": prunable_before,
        "prunable_after": prunable_after,
        "removed_fraction_prunable": 1 - prunable_after / prunable_before if prunable_before else 0.0,
        "plan_params_after": plan.get("params", {}).get("model_after"),
        "file_bytes": file_bytes,
        "dense_file_bytes": dense_bytes,
        "size_ratio": file_bytes / dense_bytes,
        "matrices": counts,
    }


__all__ = ["DENSE_ABOVE", "STAGE", "ApplyOptions", "predict", "run_apply", "storage_layout"]
