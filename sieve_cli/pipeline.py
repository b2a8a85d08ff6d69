"""`sieve run`: every stage in order, each skipped when its outputs are up to date.

The workspace is opened with `replace_stale=True`, so a stage whose inputs changed
(a new task, other options) re-runs along with everything downstream of it, like
`make`; a stage whose inputs did not change does nothing, so a rerun after a crash
continues where it stopped (capture and search also resume mid-stage).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from .apply import run_apply
from .capture import run_capture
from .discover import run_discover
from .evaluate import run_eval, run_label
from .files import sha256_file
from .fit import run_fit
from .heal import run_heal
from .options import ApplyOptions, DiscoverOptions, RunOptions
from .search import run_search
from .tasks import bind_task
from .workspace import Stage, Workspace

log = logging.getLogger(__name__)


@dataclass
class StageReport:
    stage: str
    ran: bool  # False: its outputs were already up to date
    seconds: float


@dataclass
class RunResult:
    workspace: Path
    out: Path
    stages: list[StageReport]
    plan: dict
    apply: dict
    dense: dict  # eval results on the test split
    pruned: dict
    healed: dict | None = None  # with --heal: the healed model's eval results, its folder and apply's numbers
    healed_out: Path | None = None
    healed_apply: dict | None = None
    dense_healed: dict | None = None  # with --heal: the dense model healed by the same recipe, on the test split


def run_pipeline(options: RunOptions, on_stage: Callable[[StageReport], None] | None = None) -> RunResult:
    """discover -> task -> capture -> fit -> search -> (heal) -> apply -> eval (dense and pruned, test split).

    With `options.heal`, the search judges its candidates healed, the plan's model is healed and applied
    (`apply --healed`) to `options.healed_folder`, and evaluated beside the plain pruned one and the dense
    model healed by the same recipe.
    """
    ws = Workspace(options.workspace, replace_stale=True)
    reports: list[StageReport] = []

    def written(stage: str) -> str | None:  # the manifest file itself: rewritten exactly when the stage ran
        path = ws.manifest_path(stage)
        return sha256_file(path) if path.exists() else None

    def stage(name: str, manifest_stage: str, fn: Callable[[], dict]) -> dict:
        before = written(manifest_stage)
        started = time.perf_counter()
        result = fn()
        report = StageReport(name, written(manifest_stage) != before, time.perf_counter() - started)
        reports.append(report)
        if on_stage:
            on_stage(report)
        return result

    stage("discover", Stage.DISCOVER, lambda: run_discover(ws, DiscoverOptions(options.model, options.dtype, options.device)))
    stage("task", Stage.TASK, lambda: bind_task(ws, options.task, split=options.split, data_root=options.data_root))
    stage("capture", Stage.CAPTURE, lambda: run_capture(ws, options.capture))
    stage("fit", ws.fit_stage(options.fit.method), lambda: run_fit(ws, options.fit))
    plan = stage("search", Stage.SEARCH, lambda: run_search(ws, options.search))
    if options.heal is not None:
        stage("heal", Stage.HEAL, lambda: run_heal(ws, options.heal))
    apply_options = ApplyOptions(out=options.out, dtype=options.apply_dtype, quantize=options.quantize)
    applied = stage("apply", Stage.APPLY, lambda: run_apply(ws, apply_options))
    healed_out = Path(options.healed_folder).resolve() if options.heal is not None else None
    if healed_out is not None:
        healed = ApplyOptions(out=healed_out, dtype=options.apply_dtype, quantize=options.quantize, healed=True)
        healed_apply = stage("apply healed", Stage.apply(healed=True), lambda: run_apply(ws, healed))
    test = replace(options.eval, split="test", model=None)
    dense = stage("eval dense", Stage.eval(run_label(test)), lambda: run_eval(ws, test))
    pruned_eval = replace(test, model=str(options.out))
    pruned = stage("eval pruned", Stage.eval(run_label(pruned_eval)), lambda: run_eval(ws, pruned_eval))
    result = RunResult(ws.root, Path(options.out).resolve(), reports, plan, applied, dense, pruned)
    if healed_out is not None:
        healed_eval = replace(test, model=str(healed_out))
        result.healed = stage("eval healed", Stage.eval(run_label(healed_eval)), lambda: run_eval(ws, healed_eval))
        result.healed_out, result.healed_apply = healed_out, healed_apply
        dense_healed = replace(test, heal_dense=options.heal.steps, heal_recipe=options.heal)  # what healing alone would give
        result.dense_healed = stage("eval dense healed", Stage.eval(run_label(dense_healed)),
                                    lambda: run_eval(ws, dense_healed))
    return result
