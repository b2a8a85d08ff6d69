"""Stage 3, fit: per-matrix factor bases and output-error spectra from the capture statistics.

`run_fit` reads the capture store one input site at a time, factorises every matrix of the
site with one method (the math is in `factorize.py`, one site in `fit_site`) and writes
`WS/fit/<method>/`: `factors.json` + `factors-block-NNN.safetensors` (a `FactorSet`: bases
cut at the break-even rank, in the model's dtype by default), `spectrum.json` (relative
output error per rank, every rank) and, for learned, `training.json`.
Each method is its own stage, `fit/<method>`, so several coexist in one workspace.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import memory, progress
from .blockwise import SafetensorsWeights, capture_and_fit_workspace
from .calibration import calibration_sequences
from .discover import load_workspace_model, workspace_model_source
from .errors import InputError, MissingStageError
from .factorize import (
    Basis,
    GramEigen,
    TrainSettings,
    error_at_fraction,
    gram_eigen,
    learn_factors,
    output_basis,
    output_error,
    output_total,
    pca_basis,
    svd_basis,
    truncate,
)
from .factors import LEGACY_FILE, FactorSet, StoredFactors, break_even_rank
from .files import read_json, remove_path, write_json_atomic
from .lowrank import rank_for_fraction
from .matrices import Matrix, find_matrices, sites_of, weight_of
from .models import load_tokenizer, safetensors_folder, torch_dtype
from .narrowing import WidthUnit, width_units
from .options import FIT_METHODS, SUMMARY_LEVELS, CaptureOptions, FitOptions, fitted_what
from .store import read_site
from .tasks import bind_task
from .width import obs_batch, width_basis
from .workspace import Stage, Workspace

log = logging.getLogger(__name__)

TRAINING_FILE = "training.json"  # learned only: steps and the optimum per trained rank


class EmptySiteError(InputError):
    """A capture site saw no calibration tokens, so nothing can be fitted for its matrices."""


# ---- reading fit outputs (what search and apply import) ------------------------------


def train_settings(options: FitOptions) -> TrainSettings:
    return TrainSettings(lr=options.lr, max_steps=options.max_steps, tol=options.tol, decays=options.decays,
                         seed=options.seed)


def stored_dtype(options: FitOptions, weight: torch.Tensor) -> torch.dtype:
    """The dtype factors are stored in: the weight's ("model") or the one `--factor-dtype` names."""
    return weight.dtype if options.factor_dtype == "model" else getattr(torch, options.factor_dtype)


def _require_fit(ws: Workspace, method: str) -> dict:
    if method not in FIT_METHODS:
        raise InputError(f"unknown fit method {method!r}; use one of {', '.join(FIT_METHODS)}")
    manifest = ws.read_manifest(ws.fit_stage(method))
    if manifest is None or not manifest.get("complete"):
        others = [m for m in FIT_METHODS if m != method and (ws.read_manifest(ws.fit_stage(m)) or {}).get("complete")]
        also = f" (or use the {others[0]} fit it has: --method {others[0]})" if others else ""
        raise MissingStageError(
            f"workspace {ws.root} has no finished {method} fit; run `sieve fit -w {ws.root} --method {method}` "
            f"first{also}")
    return manifest


def require_fit(ws: Workspace, method: str) -> None:
    """One line naming the fit to run (and a finished one to use instead) when `method` was not fitted."""
    _require_fit(ws, method)


def load_factors(ws: Workspace, method: str = "output") -> StoredFactors:
    """The fitted factors of `method` in this workspace, read lazily (see `StoredFactors`)."""
    _require_fit(ws, method)
    return FactorSet.load(ws.factors_file(method))


def load_spectrum(ws: Workspace, method: str = "output") -> dict[str, list[float | None]]:
    """{matrix name: relative output error at rank r, r = 0..K}; None at ranks not fitted (learned)."""
    _require_fit(ws, method)
    return read_json(ws.spectrum_json(method), rebuild=f"sieve fit -w {ws.root} --method {method} --force")


# ---- the stage ---------------------------------------------------------------------


def run_fit(ws: Workspace, options: FitOptions, force: bool = False, model: nn.Module | None = None) -> dict:
    """Fit every prunable matrix with `options.method`; returns the summary (see `summarise`).

    `model` may be passed when the caller has already loaded the workspace's model.
    Re-running with unchanged inputs does nothing and returns the recorded summary.
    Without a model: when the capture was block-wise and kept no statistics, they are
    computed again block by block; when the whole model does not fit the memory budget,
    each matrix's weight is read from the safetensors files instead of loading the model.
    """
    stage = ws.fit_stage(options.method)
    inputs = {"options": options.recorded(), "upstream": ws.upstream_hashes(Stage.DISCOVER, Stage.CAPTURE)}
    if not ws.begin(stage, inputs, force):
        log.info("%s is up to date in %s; nothing to do (--force refits)", stage, ws.root)
        return {**ws.read_manifest(stage)["summary"], "up_to_date": True}
    if model is None and not ws.read_manifest(Stage.CAPTURE)["summary"].get("stats_kept", True):
        return _refit_blockwise(ws, options, inputs, force)
    load_seconds, mode = 0.0, "memory" if model is not None else _choose_fit_mode(ws, options)
    if mode == "memory":
        if model is None:
            started = time.perf_counter()
            model, _ = load_workspace_model(ws, device="cpu")  # weights are read once, then moved per matrix
            load_seconds = time.perf_counter() - started
        matrices, weight = find_matrices(model), (lambda m: weight_of(model.get_submodule(m.name)))
    else:
        matrices, weight = workspace_matrices(ws), _file_weights(ws)
    started = time.perf_counter()
    training: dict = {}
    ws.verify_folder(Stage.CAPTURE, ws.capture_store)  # a garbled chunk would give a fit of garbage
    units = model_width_units(ws, matrices, model) if options.method == "width" else None
    factors, spectrum = fit_matrices(matrices, ws.capture_store, weight, options, training, units)
    return _write_fit(ws, stage, inputs, options, factors, spectrum, matrices, time.perf_counter() - started,
                      load_seconds, mode, training)


def model_width_units(ws: Workspace, matrices: list[Matrix], model: nn.Module | None = None) -> list[WidthUnit]:
    """The workspace model's width units (its config from the loaded model, else from its folder)."""
    if model is not None:
        config = model.config
    else:
        config = read_json(safetensors_folder(workspace_model_source(ws)) / "config.json")
    model_type = getattr(config, "model_type", None) or config["model_type"]
    units = width_units(matrices, model_type, config)
    if not units:
        raise InputError(f"{model_type} has no module whose width sieve can cut; use --method output")
    return units


def record_blockwise_fit(ws: Workspace, options: FitOptions, factors: FactorSet, spectrum: dict, seconds: float) -> dict:
    """Record a fit made elsewhere (the block-wise capture) as the `fit/<method>` stage, with
    the inputs `run_fit` would record, so a later `sieve fit` finds it up to date."""
    stage = ws.fit_stage(options.method)
    inputs = {"options": options.recorded(), "upstream": ws.upstream_hashes(Stage.DISCOVER, Stage.CAPTURE)}
    ws.begin(stage, inputs, force=True)  # the capture just changed: an older fit is replaced
    return _write_fit(ws, stage, inputs, options, factors, spectrum, workspace_matrices(ws), seconds, 0.0, "blockwise")


def _write_fit(ws, stage, inputs, options, factors, spectrum, matrices, seconds, load_seconds, mode,
               training: dict | None = None) -> dict:
    written = save_fit(ws, options.method, factors, spectrum, training)
    targets = factors.width_units() if options.method == "width" else matrices
    summary = {**summarise(targets, spectrum, options, seconds, load_seconds, training), "mode": mode}
    ws.finish(stage, inputs, written, summary)
    # per-block results: this block-wise refit's, now in the fit's files, or a killed one's, unused by any other fit
    remove_path(ws.inside(ws.fit_dir(options.method) / "blockwise"))
    log.info("fit %s: %d %s in %.1f s (%s)", options.method, summary["matrices"], fitted_what(options.method),
             seconds, mode)
    return summary


def workspace_matrices(ws: Workspace) -> list[Matrix]:
    """The prunable matrices that `sieve discover` recorded, without loading the model."""
    return [Matrix.from_dict(m) for m in read_json(ws.matrices_json)["matrices"]]


def _choose_fit_mode(ws: Workspace, options: FitOptions) -> str:
    """memory (load the model) or file (read each weight from the safetensors files), as
    asked or (auto) as the estimate fits; refuses a fit that cannot fit at all."""
    shape, run = memory.workspace_shapes(ws, _capture_options(ws, dtype=None), device=options.device)
    in_memory, per_matrix = memory.fit_in_memory(shape, run), memory.fit_from_store(shape, run)
    if options.memory_budget is not None:
        budget, source = memory.parse_bytes(options.memory_budget), "--memory-budget"
    else:
        budget, source = memory.free_bytes(options.device), f"the free memory of {options.device}"
    dtype = ws.require(Stage.DISCOVER)["inputs"]["options"]["dtype"]
    chosen = memory.choose_mode(options.mode, in_memory, per_matrix, budget, source, dtype)
    log.info("%s; budget %s (%s)", (in_memory if chosen == "memory" else per_matrix).describe(), memory.gib(budget), source)
    return chosen


def _capture_options(ws: Workspace, **changes) -> CaptureOptions:
    """The options the workspace's capture ran with (as recorded in its manifest), changed by `changes`."""
    recorded = ws.require(Stage.CAPTURE)["inputs"].get("options", {})
    known = {f.name for f in fields(CaptureOptions)}
    ran_before = {"share_prefix": False}  # a capture recorded before the option existed ran every example whole
    return CaptureOptions(**{**ran_before, **{k: v for k, v in recorded.items() if k in known}, **changes})


def _file_weights(ws: Workspace) -> Callable[[Matrix], torch.Tensor]:
    weights = SafetensorsWeights(safetensors_folder(workspace_model_source(ws)))
    dtype = torch_dtype(ws.require(Stage.DISCOVER)["inputs"]["options"]["dtype"])

    def weight(m: Matrix) -> torch.Tensor:
        tensor = weights.get([f"{m.name}.weight"]).to(dtype)
        return tensor.T if m.transposed else tensor

    return weight


def _refit_blockwise(ws: Workspace, options: FitOptions, inputs: dict, force: bool) -> dict:
    """The block-wise capture kept no statistics: compute them again, block by block, and fit."""
    capture_options = _capture_options(ws, device=options.device, mode="blockwise", memory_budget=options.memory_budget)
    tokenizer = load_tokenizer(workspace_model_source(ws))
    sequences, _ = calibration_sequences(bind_task(ws, None), capture_options, tokenizer)
    started = time.perf_counter()
    site_fit = fit_site
    if options.method == "width":  # each block's out matrices fitted as their units, as in memory
        site_fit = partial(fit_site, units={u.out: u for u in model_width_units(ws, workspace_matrices(ws))})
    result = capture_and_fit_workspace(ws, capture_options, sequences, [options], tokenizer, site_fit,
                                       fingerprint=str(inputs), fresh=force, work=ws.fit_dir(options.method) / "blockwise")
    log.info("recomputed the statistics block by block in %.1f s", time.perf_counter() - started)
    summary = _write_fit(ws, ws.fit_stage(options.method), inputs, options, result.factors[options.method],
                         result.spectra[options.method], workspace_matrices(ws), result.fit_seconds[options.method], 0.0,
                         "blockwise")
    return summary


def save_fit(ws: Workspace, method: str, factors: FactorSet, spectrum: dict, training: dict | None = None) -> list[Path]:
    """Write a fit's files into WS/fit/<method>/ (the one writer of the fit format); returns them."""
    folder = ws.fit_dir(method)
    folder.mkdir(parents=True, exist_ok=True)
    for old in [folder / LEGACY_FILE, *folder.glob("factors-*.safetensors")]:
        old.unlink(missing_ok=True)  # shards of an earlier fit must not linger beside the new index
    written = factors.save(ws.factors_file(method))
    write_json_atomic(ws.spectrum_json(method), spectrum)
    written.append(ws.spectrum_json(method))
    if training:
        write_json_atomic(folder / TRAINING_FILE, training)
        written.append(folder / TRAINING_FILE)
    return written


def record_fit(ws: Workspace, method: str, factors: FactorSet, spectrum: dict, inputs: dict) -> None:
    """A finished fit/<method> stage from factors made outside `run_fit` (the Python API, test fixtures)."""
    stage = ws.fit_stage(method)
    ws.begin(stage, inputs, force=True)
    ws.finish(stage, inputs, save_fit(ws, method, factors, spectrum))


def fit_model(model: nn.Module, store: Path, options: FitOptions, training: dict | None = None) -> tuple[FactorSet, dict]:
    """(factors, spectrum) of every prunable matrix, reading the store one site at a time."""
    return fit_matrices(find_matrices(model), store, lambda m: weight_of(model.get_submodule(m.name)), options,
                        training)


def fit_matrices(matrices: list[Matrix], store: Path, weight: Callable[[Matrix], torch.Tensor],
                 options: FitOptions, training: dict | None = None,
                 units: list[WidthUnit] | None = None) -> tuple[FactorSet, dict]:
    """(factors, spectrum) of `matrices`, whose weights (H x D) `weight` gives, one site at a time.

    For `learned`, `training` (when given) receives per matrix and trained rank the Adam steps,
    why training stopped and the exact optimum's relative error at that rank. For `width`,
    `units` are the width units to fit (each from the Gram of its out matrix's input site).
    """
    factors, spectrum = FactorSet(options.method), {}
    by_out = {u.out: u for u in units or ()}
    with progress.bar(f"fit {options.method}", total=len(matrices)) as bar:
        for site, members in sites_of(matrices).items():
            if options.method == "width" and not any(m.name in by_out for m in members):
                bar.advance(len(members))  # a site no width unit reads (q/k/v's, gate/up's): nothing to fit
                continue
            fit_site(site, members, _read_site(store, site), weight, options, factors, spectrum, training,
                     after=bar.advance, units=by_out)
    return factors, spectrum


def fit_site(site: str, members: list[Matrix], stats, weight: Callable[[Matrix], torch.Tensor], options: FitOptions,
             factors: FactorSet, spectrum: dict, training: dict | None = None,
             after: Callable[[], None] | None = None, units: dict[str, WidthUnit] | None = None) -> None:
    """Fit the matrices of one input site from its statistics into `factors` and `spectrum`.

    The one place both modes fit: the in-memory fit (a site read from the store) and the
    block-wise loop (a site's statistics just computed). Bases are kept only up to each
    matrix's break-even rank, in the stored dtype, as soon as they are computed, so the fit
    never holds more than the lean factors.
    """
    device = torch.device(options.device)
    C = _checked_gram(stats, site, members).to(device, torch.float64)
    eigen = None  # of C, computed at most once per site and shared by its matrices
    for m in members:
        if options.method == "width":
            _fit_width(m, (units or {}).get(m.name), weight, C, factors, spectrum)
            if after is not None:
                after()
            continue
        tensor = weight(m)
        W = tensor.detach().to(device, torch.float64)
        dtype = stored_dtype(options, tensor)
        factors.blocks[m.name] = m.block
        if options.method == "learned":
            pairs, spectrum[m.name], details = _fit_learned(W, C, options)
            factors.fixed[m.name] = {r: (_stored(B, dtype), _stored(A, dtype)) for r, (B, A) in pairs.items()}
            if training is not None:
                training[m.name] = details
        else:
            if eigen is None and (options.method == "pca" or m.out_features > m.in_features):
                eigen = gram_eigen(C)
            basis = _fit_closed_form(options.method, W, C, eigen)
            B, A = truncate(basis.B, basis.A, min(basis.rank_limit, break_even_rank(*W.shape)))
            factors.full[m.name] = (_stored(B, dtype), _stored(A, dtype))
            spectrum[m.name] = basis.relative().tolist()
        if after is not None:
            after()


def _fit_width(m: Matrix, unit: WidthUnit | None, weight, C: torch.Tensor, factors: FactorSet, spectrum: dict) -> None:
    """The width fit of the unit whose out matrix is `m` (none for a row matrix: nothing to do)."""
    if unit is None:
        return
    W = weight(m).detach().to(C.device, torch.float64)
    basis = width_basis(W, C, unit.unit_size, obs_batch(unit.units))
    factors.widths[unit.name], factors.blocks[unit.name] = (unit, basis), unit.block
    spectrum[unit.name] = basis.relative().tolist()


def _fit_closed_form(method: str, W: torch.Tensor, C: torch.Tensor, eigen: GramEigen | None) -> Basis:
    if method == "svd":
        return svd_basis(W, C)
    if method == "pca":
        return pca_basis(W, C, eigen)
    return output_basis(W, C, eigen)


def _fit_learned(W: torch.Tensor, C: torch.Tensor, options: FitOptions):
    """Trained (B, A) per level, the spectrum with None at the ranks not trained, and per rank
    the training's steps and stop reason beside the exact optimum's error (its lower bound)."""
    H, D = W.shape
    ranks = sorted({r for p in options.levels if (r := rank_for_fraction(p, H, D)) is not None})
    optimum = output_basis(W, C)  # the global optimum at every rank: what learned approaches from above
    optimum_relative = optimum.relative()
    total = output_total(W, C)
    pairs, details = {}, {}
    relative: list[float | None] = [None] * (min(H, D) + 1)
    for rank in ranks:
        init = truncate(optimum.B, optimum.A, rank) if options.init == "output" else None
        trained = learn_factors(W, C, rank, train_settings(options), init=init)
        pairs[rank] = (trained.B, trained.A)
        relative[rank] = output_error(W, C, trained.B, trained.A) / total if total > 0 else 0.0
        details[str(rank)] = {"steps": trained.steps, "stopped": trained.stopped,
                              "relative": relative[rank], "optimum": float(optimum_relative[rank])}
    return pairs, relative, details


def _stored(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to("cpu", dtype).contiguous()


def _read_site(store: Path, site: str):

    return read_site(store, site)


def _checked_gram(stats, site: str, members: list[Matrix]) -> torch.Tensor:
    if stats.tokens <= 0:
        raise EmptySiteError(
            f"capture site {site} saw no calibration tokens; rerun `sieve capture --force` with more --tokens"
        )
    D = members[0].in_features
    if tuple(stats.gram.shape) != (D, D):
        raise InputError(
            f"capture site {site} has a {tuple(stats.gram.shape)} Gram but its matrices read {D} features; "
            f"the capture was made from another model: rerun `sieve capture --force`"
        )
    return stats.gram


# ---- the summary -------------------------------------------------------------------


def summarise(matrices: list[Matrix], spectrum: dict, options: FitOptions, seconds: float, load_seconds: float,
              training: dict | None = None) -> dict:
    """Counts, times and the mean relative output error per matrix kind at each reported level.

    For `learned` also, per kind and level, the mean Adam steps and the mean relative error
    of the exact optimum at the same ranks (`optimum_error`), which learned approaches from above.
    """
    levels = options.levels if options.method == "learned" else SUMMARY_LEVELS
    by_kind: dict[str, dict[str, list[float]]] = {}
    steps: dict[str, dict[str, list[float]]] = {}
    optimum: dict[str, dict[str, list[float]]] = {}
    for m in matrices:
        for p in levels:
            value = error_at_fraction(spectrum[m.name], m.level_for(p))
            if value is not None:
                by_kind.setdefault(m.kind, {}).setdefault(str(p), []).append(value)
            rank = m.level_for(p)
            trained = (training or {}).get(m.name, {}).get(str(rank))
            if trained is not None:
                steps.setdefault(m.kind, {}).setdefault(str(p), []).append(trained["steps"])
                optimum.setdefault(m.kind, {}).setdefault(str(p), []).append(trained["optimum"])
    summary = {
        "method": options.method,
        "matrices": len(matrices),
        "seconds": round(seconds, 3),
        "load_seconds": round(load_seconds, 3),
        "levels": list(levels),
        "counts": {kind: sum(1 for m in matrices if m.kind == kind) for kind in dict.fromkeys(m.kind for m in matrices)},
        "relative_error": _means(by_kind),  # kind -> kept fraction -> mean relative output error
        "spectrum": "relative output error at ranks 0..K" + (", null where no factors were trained" if options.method == "learned" else ""),
    }
    if training:
        summary["steps"] = _means(steps)
        summary["optimum_error"] = _means(optimum)
        stops = [d["stopped"] for per_rank in training.values() for d in per_rank.values()]
        summary["stopped"] = {reason: stops.count(reason) for reason in sorted(set(stops))}
    return summary


def _means(grouped: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    return {kind: {p: _mean(v) for p, v in per_level.items()} for kind, per_level in grouped.items()}


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else float("nan")


__all__ = ["EmptySiteError", "FitOptions", "fit_matrices", "fit_model", "fit_site", "load_factors",
           "load_spectrum", "record_blockwise_fit", "run_fit"]
