"""Stage 3, fit: per-matrix factor bases and output-error spectra from the capture statistics.

`run_fit` reads the capture store one input site at a time, factorises every matrix of the
site with one method (the math is in `factorize.py`) and writes `WS/fit/<method>/`:
`factors.safetensors` (a `FactorSet`) and `spectrum.json` (relative output error per rank).
Each method is its own stage, `fit/<method>`, so several coexist in one workspace.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from torch import nn

from . import progress
from .capture import read_site  # capture owns the store format
from .discover import load_workspace_model
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
    pca_basis,
    svd_basis,
    truncate,
)
from .factors import FactorSet
from .files import read_json, write_json_atomic
from .lowrank import rank_for_fraction
from .matrices import Matrix, find_matrices, sites_of, weight_of
from .options import FIT_METHODS, SUMMARY_LEVELS, FitOptions
from .workspace import Stage, Workspace

log = logging.getLogger(__name__)

METHODS = FIT_METHODS


class EmptySiteError(InputError):
    """A capture site saw no calibration tokens, so nothing can be fitted for its matrices."""


# ---- reading fit outputs (what search and apply import) ------------------------------


def train_settings(options: FitOptions) -> TrainSettings:
    return TrainSettings(lr=options.lr, epochs=options.epochs, batch_rows=options.batch_rows, seed=options.seed)


def _require_fit(ws: Workspace, method: str) -> dict:
    if method not in METHODS:
        raise InputError(f"unknown fit method {method!r}; use one of {', '.join(METHODS)}")
    manifest = ws.read_manifest(ws.fit_stage(method))
    if manifest is None or not manifest.get("complete"):
        raise MissingStageError(
            f"workspace {ws.root} has no finished {method} fit; run `sieve fit -w {ws.root} --method {method}` first"
        )
    return manifest


def load_factors(ws: Workspace, method: str = "output") -> FactorSet:
    """The fitted factors of `method` in this workspace."""
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
    """
    stage = ws.fit_stage(options.method)
    inputs = {"options": options.recorded(), "upstream": ws.upstream_hashes(Stage.DISCOVER, Stage.CAPTURE)}
    if not ws.begin(stage, inputs, force):
        log.info("%s is up to date in %s; nothing to do (--force refits)", stage, ws.root)
        return {**ws.read_manifest(stage)["summary"], "up_to_date": True}
    load_seconds = 0.0
    if model is None:
        started = time.perf_counter()
        model, _ = load_workspace_model(ws, device="cpu")  # weights are read once, then moved per matrix
        load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    factors, spectrum = fit_model(model, ws.capture_store, options)
    seconds = time.perf_counter() - started
    written = save_fit(ws, options.method, factors, spectrum)
    summary = summarise(find_matrices(model), spectrum, options, seconds, load_seconds)
    ws.finish(stage, inputs, written, summary)
    log.info("fit %s: %d matrices in %.1f s", options.method, summary["matrices"], seconds)
    return summary


def save_fit(ws: Workspace, method: str, factors: FactorSet, spectrum: dict) -> list[Path]:
    """Write a fit's files into WS/fit/<method>/ (the one writer of the fit format); returns them."""
    ws.fit_dir(method).mkdir(parents=True, exist_ok=True)
    factors.save(ws.factors_file(method))
    write_json_atomic(ws.spectrum_json(method), spectrum)
    return [ws.factors_file(method), ws.spectrum_json(method)]


def record_fit(ws: Workspace, method: str, factors: FactorSet, spectrum: dict, inputs: dict) -> None:
    """A finished fit/<method> stage from factors made outside `run_fit` (the Python API, test fixtures)."""
    stage = ws.fit_stage(method)
    ws.begin(stage, inputs, force=True)
    ws.finish(stage, inputs, save_fit(ws, method, factors, spectrum))


def fit_model(model: nn.Module, store: Path, options: FitOptions) -> tuple[FactorSet, dict]:
    """(factors, spectrum) of every prunable matrix, reading the store one site at a time."""
    matrices = find_matrices(model)
    factors, spectrum = FactorSet(options.method), {}
    device = torch.device(options.device)
    with progress.bar(f"fit {options.method}", total=len(matrices)) as bar:
        for site, members in sites_of(matrices).items():
            stats = _read_site(store, site)
            C = _checked_gram(stats, site, members).to(device, torch.float64)
            samples = stats.samples if options.method == "learned" else None
            eigen = None  # of C, computed at most once per site and shared by its matrices
            for m in members:
                W = weight_of(model.get_submodule(m.name)).detach().to(device, torch.float64)
                if options.method == "learned":
                    factors.fixed[m.name], spectrum[m.name] = _fit_learned(W, C, samples, options)
                else:
                    if eigen is None and (options.method == "pca" or m.out_features > m.in_features):
                        eigen = gram_eigen(C)
                    basis = _fit_closed_form(options.method, W, C, eigen)
                    factors.full[m.name] = (_stored(basis.B), _stored(basis.A))
                    spectrum[m.name] = basis.relative().tolist()
                bar.advance()
                bar.note(m.name)
    return factors, spectrum


def _fit_closed_form(method: str, W: torch.Tensor, C: torch.Tensor, eigen: GramEigen | None) -> Basis:
    if method == "svd":
        return svd_basis(W, C)
    if method == "pca":
        return pca_basis(W, C, eigen)
    return output_basis(W, C, eigen)


def _fit_learned(W: torch.Tensor, C: torch.Tensor, samples: torch.Tensor, options: FitOptions):
    """Trained (B, A) per level, and the spectrum with None at the ranks not trained."""
    H, D = W.shape
    pairs = {}
    ranks = sorted({r for p in options.levels if (r := rank_for_fraction(p, H, D)) is not None})
    basis = output_basis(W, C) if options.init == "output" else None
    for rank in ranks:
        init = tuple(f.float() for f in truncate(basis.B, basis.A, rank)) if basis is not None else None
        B, A = learn_factors(W.float(), samples, rank, train_settings(options), init=init)
        pairs[rank] = (_stored(B), _stored(A))
    total = float(((W @ C) * W).sum())
    relative: list[float | None] = [None] * (min(H, D) + 1)
    for rank, (B, A) in pairs.items():
        relative[rank] = output_error(W, C, B.to(W.device), A.to(W.device)) / total if total > 0 else 0.0
    return pairs, relative


def _stored(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).contiguous()


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


def summarise(matrices: list[Matrix], spectrum: dict, options: FitOptions, seconds: float, load_seconds: float) -> dict:
    """Counts, times and the mean relative output error per matrix kind at each reported level."""
    levels = options.levels if options.method == "learned" else SUMMARY_LEVELS
    by_kind: dict[str, dict[str, list[float]]] = {}
    for m in matrices:
        for p in levels:
            value = error_at_fraction(spectrum[m.name], p, m.out_features, m.in_features)
            if value is not None:
                by_kind.setdefault(m.kind, {}).setdefault(str(p), []).append(value)
    errors = {kind: {p: _mean(v) for p, v in per_level.items()} for kind, per_level in by_kind.items()}
    return {
        "method": options.method,
        "matrices": len(matrices),
        "seconds": round(seconds, 3),
        "load_seconds": round(load_seconds, 3),
        "levels": list(levels),
        "counts": {kind: sum(1 for m in matrices if m.kind == kind) for kind in dict.fromkeys(m.kind for m in matrices)},
        "relative_error": errors,  # kind -> kept fraction -> mean relative output error
        "spectrum": "relative output error at ranks 0..K" + (", null where no factors were trained" if options.method == "learned" else ""),
    }


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else float("nan")


__all__ = ["EmptySiteError", "FitOptions", "METHODS", "fit_model", "load_factors", "load_spectrum", "run_fit"]
