"""Reading a workspace into plain data for the report: nothing is recomputed, nothing drawn."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, MissingStageError
from ..files import read_json
from ..fit import load_spectrum
from ..plan import Plan
from ..pruned import SIEVE_JSON
from ..ranks import fraction_for_rank
from ..workspace import Stage, Workspace

# side by side in this order, other models after
LABEL_ORDER = {"dense": 0, "dense healed": 1, "pruned": 2, "pruned healed": 3}


class ReportInputError(InputError):
    """The workspace lacks what the report needs (a finished search)."""


@dataclass
class Score:
    label: str
    value: float
    ci_low: float | None = None
    ci_high: float | None = None
    n: int | None = None


@dataclass
class Curve:
    """One fit method's spectra: per kind, per block, (kept fractions, relative errors)."""

    method: str
    lines: dict[str, list[tuple[int, list[float], list[float]]]]
    chosen: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # the plan's points


@dataclass
class Trials:
    """Every evaluation of one search (one fit method): x = removed fraction, y = metric."""

    method: str
    uniform: list[tuple[float, float]]
    adaptive: list[tuple[float, float]]


@dataclass
class Data:
    ws: Workspace
    plan: dict
    matrices: list[dict]
    total_params: int
    dtype: str
    scores: list[Score]
    spectra: list[Curve]
    trials: list[Trials]
    manifests: dict[str, dict]
    applied: dict | None  # apply's result.json when it was made from this plan
    pruned_bytes: int | None  # weights file of the evaluated pruned model
    notes: dict[str, str]  # section -> why it is skipped or partial


def collect(ws: Workspace) -> Data:
    """Everything the report shows, read from the workspace; only a finished search is required."""
    try:
        ws.require(Stage.SEARCH)
    except MissingStageError as exc:
        raise ReportInputError(f"nothing to report yet: {exc}") from None
    plan = Plan.load(ws.plan_json).describable(str(ws.plan_json)).data
    found = read_json(ws.matrices_json)
    manifests = {stage: m for stage in _stages(ws) if (m := ws.read_manifest(stage)) is not None}
    notes: dict[str, str] = {}
    scores, pruned_dir = read_scores(ws, plan, notes)
    spectra = [read_spectrum(ws, method, found["matrices"], plan) for method in fitted_methods(ws)]
    if not spectra:
        notes["spectra"] = f"no finished fit in the workspace; run `sieve fit -w {ws.root}`"
    trials = read_trials(ws, plan)
    if not trials or not (trials[0].uniform or trials[0].adaptive):
        notes["tradeoff"] = f"{ws.history_jsonl.name} is missing or empty"
    return Data(ws=ws, plan=plan, matrices=found["matrices"], total_params=int(found["total_params"]),
                dtype=_discover_dtype(manifests), scores=scores, spectra=spectra, trials=trials,
                manifests=manifests, applied=read_applied(ws, notes), pruned_bytes=_saved_bytes(pruned_dir),
                notes=notes)


def _stages(ws: Workspace) -> list[str]:
    fits = [ws.fit_stage(m) for m in fitted_methods(ws, finished=False)]
    evals = [Stage.eval(p.name) for p in sorted(ws.eval_dir.iterdir()) if p.is_dir()] if ws.eval_dir.is_dir() else []
    return [Stage.DISCOVER, Stage.TASK, Stage.CAPTURE, *fits, Stage.SEARCH, Stage.APPLY, *evals]


def fitted_methods(ws: Workspace, finished: bool = True) -> list[str]:
    """The fit methods with a manifest in the workspace, `output` first."""
    root = ws.stage_dir("fit")
    if not root.is_dir():
        return []
    methods = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        manifest = ws.read_manifest(ws.fit_stage(folder.name))
        if manifest is not None and (manifest.get("complete") or not finished):
            methods.append(folder.name)
    return sorted(methods, key=lambda m: (m != "output", m))


def _discover_dtype(manifests: dict) -> str:
    return ((manifests.get("discover") or {}).get("inputs", {}).get("options", {}) or {}).get("dtype", "float32")


def read_applied(ws: Workspace, notes: dict) -> dict | None:
    """apply's counted numbers (result.json), if apply ran on the current plan."""

    manifest = ws.read_manifest("apply")
    path = ws.apply_result
    if not manifest or not manifest.get("complete") or not path.is_file():
        notes["apply"] = f"not applied yet; `sieve apply -w {ws.root} -o OUT` counts the pruned model and saves it"
        return None
    if manifest["inputs"].get("upstream", {}).get("search") not in (None, ws.manifest_hash("search")):
        notes["apply"] = "the last `sieve apply` used an earlier plan; its counts are not shown"
        return None
    return read_json(path)


def _saved_bytes(folder: Path | None) -> int | None:
    """Bytes of a pruned model folder's weight files."""
    if folder is None or not folder.is_dir():
        return None
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) or None


def read_scores(ws: Workspace, plan: dict, notes: dict) -> tuple[list[Score], Path | None]:
    """Dense and pruned scores: every finished `sieve eval` run, then the search split from the plan.

    Also returns the pruned model folder that was evaluated for this plan, if any (for its size).
    """
    scores, pruned_dir = [], None
    for result in read_eval_results(ws):
        who = result.get("model", "dense")
        label = who if who in ("dense", "dense healed") else "dense"
        if who not in ("dense", "dense healed"):
            label, folder = _pruned_label(Path(who), plan)
            pruned_dir = pruned_dir or (folder if label == "pruned" else None)
        scores.append(Score(f"{label} ({result.get('split', '?')} split)", float(result["value"]),
                            _num(result.get("ci_low")), _num(result.get("ci_high")), result.get("n")))
    scores.sort(key=lambda s: (LABEL_ORDER.get(s.label.split(" (")[0].split(",")[0], len(LABEL_ORDER)), s.label))
    if not any(s.label.startswith("pruned") for s in scores):
        notes["metric"] = (f"no evaluation of the pruned model yet: run `sieve apply -w {ws.root} -o OUT` and "
                           f"`sieve eval -w {ws.root} --model OUT` (and `sieve eval -w {ws.root}` for dense) "
                           f"for test-split scores with confidence intervals")
    metric = plan["metric"]
    split = metric.get("split", "search")
    scores.append(Score(f"dense ({split} split)", float(metric["dense"]), n=plan.get("search", {}).get("examples")))
    scores.append(Score(f"plan ({split} split)", float(metric["plan"]), n=plan.get("search", {}).get("examples")))
    confirm = plan.get("search", {}).get("confirm")
    if confirm:  # the examples that checked the plan after the search chose it
        scores.append(Score("dense (confirm split)", float(confirm["dense"]), n=confirm.get("examples")))
        scores.append(Score("plan (confirm split)", float(confirm["plan"]), n=confirm.get("examples")))
    return scores, pruned_dir


def read_eval_results(ws: Workspace) -> list[dict]:
    """results.json of every finished eval run (stage `eval/<run>`, one folder per model and split)."""
    if not ws.eval_dir.is_dir():
        return []
    results = []
    for folder in sorted(p for p in ws.eval_dir.iterdir() if p.is_dir()):
        manifest = ws.read_manifest(Stage.eval(folder.name))
        path = ws.eval_results(folder.name)
        if manifest and manifest.get("complete") and path.is_file():
            result = read_json(path)
            if isinstance(result.get("value"), (int, float)):
                results.append(result)
    return results


def _pruned_label(folder: Path, plan: dict) -> tuple[str, Path]:
    """'pruned' (or 'pruned healed', made by `apply --healed`) when the folder holds this plan's model;
    otherwise say what it is."""
    info_path = folder / SIEVE_JSON
    if not info_path.is_file():
        return f"model {folder.name}", folder
    info = read_json(info_path)
    saved = Plan.parse(info.get("plan"), source=str(info_path), rebuild="sieve apply --force")
    kind = "pruned healed" if info.get("healed") else "pruned"
    same = saved.ranks() == Plan(plan).ranks()
    return (kind if same else f"{kind}, other plan ({folder.name})"), folder


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) else None


def read_spectrum(ws: Workspace, method: str, matrices: list[dict], plan: dict) -> Curve:
    """Relative output error against kept fraction, per kind and block, from fit/<method>/spectrum.json."""

    spectrum = load_spectrum(ws, method)
    curve = Curve(method=method, lines={})
    planned = plan["matrices"] if plan.get("method") == method else {}
    for m in matrices:
        errors = spectrum.get(m["name"])
        if errors is None:
            continue
        h, d = m["out_features"], m["in_features"]
        points = [(fraction_for_rank(r, h, d), e) for r, e in enumerate(errors) if e is not None]
        points = [(x, y) for x, y in points if x <= 1.0 + 1e-9]
        curve.lines.setdefault(m["kind"], []).append((m["block"], [x for x, _ in points], [y for _, y in points]))
        chosen = planned.get(m["name"])
        if chosen and chosen.get("rank") is not None and chosen["rank"] < len(errors) and errors[chosen["rank"]] is not None:
            curve.chosen.setdefault(m["kind"], []).append((chosen["kept"], errors[chosen["rank"]]))
    return curve


def read_trials(ws: Workspace, plan: dict) -> list[Trials]:
    """The search history by fit method (entries without a method belong to the plan's)."""
    if not ws.history_jsonl.exists():
        return []
    by_method: dict[str, Trials] = {}
    lines = ws.history_jsonl.read_text(encoding="utf-8", errors="replace").split("\n")
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) - 1:
                break  # a search killed mid-write; its resume cuts the line off
            raise InputError(f"{ws.history_jsonl} line {number + 1} is not valid JSON; "
                             f"rerun `{ws.command_for(Stage.SEARCH)} --force` to rebuild it") from None
        if entry.get("strategy") in ("confirm", "backoff"):
            continue  # confirm-part checks and back-off steps are not search-split trials
        method = entry.get("method") or plan.get("method", "output")
        trials = by_method.setdefault(method, Trials(method, [], []))
        point = (float(entry["removed_fraction"]), float(entry["metric"]))
        # every per-matrix strategy (seeds, local, genetic) plots as the adaptive front
        (trials.uniform if entry.get("strategy") in ("uniform", None) else trials.adaptive).append(point)
    return sorted(by_method.values(), key=lambda t: (t.method != plan.get("method"), t.method))
