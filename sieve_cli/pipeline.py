"""`sieve run`: every stage in order, each skipped when its outputs are up to date.

The workspace is opened with `replace_stale=True`, so a stage whose inputs changed
(a new task, other options) re-runs along with everything downstream of it, like
`make`; a stage whose inputs did not change does nothing, so a rerun after a crash
continues where it stopped (capture and search also resume mid-stage).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from .apply import ApplyOptions, run_apply
from .capture import CaptureOptions, run_capture
from .discover import DiscoverOptions, run_discover
from .errors import InputError
from .evaluate import EvalOptions, run_eval, run_label
from .fit import FitOptions, run_fit
from .search import SearchOptions, run_search
from .tasks import SplitOptions, bind_task
from .workspace import Workspace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    model: str
    task: str
    workspace: Path
    out: Path
    strategy: str = "uniform"
    tolerance: float = 0.05
    absolute: bool = False
    method: str = "output"
    tokens: int = 200_000  # calibration tokens captured
    samples: int | None = None  # calibration examples (None: all not used for search/test)
    eval_samples: int | None = None  # examples in the search and test parts (None: the task's defaults)
    seq_len: int = 512
    dtype: str = "float32"
    device: str = "cpu"
    search: SearchOptions = field(default_factory=SearchOptions)  # GA knobs; strategy/method/tolerance come from above

    def __post_init__(self) -> None:
        for flag, value in (("--samples", self.samples), ("--eval-samples", self.eval_samples)):
            if value is not None and value < 1:
                raise InputError(f"{flag} must be >= 1, got {value}")

    def split(self) -> SplitOptions:
        base = SplitOptions()
        if self.eval_samples is not None:
            base = replace(base, max_search=self.eval_samples, max_test=self.eval_samples)
        if self.samples is not None:
            base = replace(base, calibration=self.samples)
        return base


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


def run_pipeline(options: RunOptions, on_stage: Callable[[StageReport], None] | None = None) -> RunResult:
    """discover -> task -> capture -> fit -> search -> apply -> eval (dense and pruned, test split)."""
    ws = Workspace(options.workspace, replace_stale=True)
    reports: list[StageReport] = []

    def stage(name: str, manifest_stage: str, fn: Callable[[], dict]) -> dict:
        before = ws.manifest_hash(manifest_stage)
        started = time.perf_counter()
        result = fn()
        report = StageReport(name, ws.manifest_hash(manifest_stage) != before, time.perf_counter() - started)
        reports.append(report)
        if on_stage:
            on_stage(report)
        return result

    search_options = replace(options.search, strategy=options.strategy, method=options.method,
                             tolerance=options.tolerance, absolute=options.absolute)
    stage("discover", "discover", lambda: run_discover(ws, DiscoverOptions(options.model, options.dtype, options.device)))
    stage("task", "task", lambda: bind_task(ws, options.task, split=options.split()))
    stage("capture", "capture", lambda: run_capture(ws, CaptureOptions(
        tokens=options.tokens, seq_len=options.seq_len, device=options.device)))
    stage("fit", ws.fit_stage(options.method), lambda: run_fit(ws, FitOptions(method=options.method, device=options.device)))
    plan = stage("search", "search", lambda: run_search(ws, search_options))
    applied = stage("apply", "apply", lambda: run_apply(ws, ApplyOptions(out=options.out, dtype=options.dtype)))
    test = EvalOptions(split="test", device=options.device)
    dense = stage("eval dense", "eval/" + run_label(test), lambda: run_eval(ws, test))
    pruned_eval = replace(test, model=str(options.out))
    pruned = stage("eval pruned", "eval/" + run_label(pruned_eval), lambda: run_eval(ws, pruned_eval))
    return RunResult(ws.root, Path(options.out).resolve(), reports, plan, applied, dense, pruned)

