"""The report on a tiny workspace with real stage formats: sections, findings, PNGs, missing inputs, CLI."""

import json
import re

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sieve_cli.discover import DiscoverOptions, run_discover
from sieve_cli.errors import InputError
from sieve_cli.evaluate import record_eval
from sieve_cli.factors import FactorSet
from sieve_cli.fit import record_fit
from sieve_cli.lowrank import fraction_for_rank
from sieve_cli.matrices import find_matrices, weight_of
from sieve_cli.options import CaptureOptions, GAConfig, SplitOptions
from sieve_cli.report import (
    ReportInputError,
    ReportOptions,
    describe_plan,
    heatmap_figure,
    kept_grid,
    pareto_front,
    run_report,
)
from sieve_cli.search import Scorer, SearchOptions, run_search
from sieve_cli.workspace import Workspace

from .tiny import tiny_model

# the synthetic task barely uses q and k and needs down most: the adaptive plan should show it
SENSITIVITY = {"q": 0.02, "k": 0.02, "v": 0.6, "o": 0.6, "gate": 0.6, "up": 0.6, "down": 2.0}


def write_fit(ws: Workspace, model, method: str, power: float = 2.0) -> None:
    """A task-blind SVD basis and its energy spectrum, stored as fit/<method> with its manifest."""
    full, spectrum = {}, {}
    for m in find_matrices(model):
        W = weight_of(model.get_submodule(m.name)).detach().double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        full[m.name] = ((U * S).float(), Vh.float())
        energy = (S**power).tolist()
        spectrum[m.name] = [sum(energy[r:]) / sum(energy) for r in range(len(energy) + 1)]
    record_fit(ws, method, FactorSet(method, full=full), spectrum, {"options": {"method": method}})


def synthetic_scorer(ws: Workspace) -> Scorer:
    found = json.loads(ws.matrices_json.read_text())["matrices"]
    shapes = {m["name"]: (m["kind"], m["out_features"], m["in_features"]) for m in found}

    def score(ranks):
        damage = sum(SENSITIVITY[kind] * (1 - fraction_for_rank(ranks.get(name), h, d))
                     for name, (kind, h, d) in shapes.items())
        return 0.8 - 0.8 * damage / len(shapes)

    return Scorer(score=score, metric="accuracy", examples=20)


def write_eval(ws: Workspace, label: str, model: str, value: float) -> None:
    """A finished eval run in the layout of evaluate.run_eval: WS/eval/<run>/results.json + manifest."""
    record_eval(ws, label, {"run": label, "split": "test", "model": model, "metric": "accuracy", "value": value,
                            "ci_low": value - 0.05, "ci_high": value + 0.04, "n": 120},
                {"options": {"split": "test", "model": model}})


def base_workspace(root, tiny_dir) -> Workspace:
    ws = Workspace(root)
    run_discover(ws, DiscoverOptions(model=str(tiny_dir)))
    ws.begin("task", {"task": "synthetic"})
    ws.finish("task", {"task": "synthetic"}, [])
    model = tiny_model("llama")
    write_fit(ws, model, "output")
    write_fit(ws, model, "svd", power=1.0)
    return ws


@pytest.fixture(scope="module")
def full_ws(tmp_path_factory, tiny_dir):
    """discover, two fits, an adaptive search, a saved pruned model, and dense + pruned test evals."""
    from sieve_cli.apply import ApplyOptions, run_apply

    root = tmp_path_factory.mktemp("report")
    ws = base_workspace(root / "ws", tiny_dir)
    options = SearchOptions(method="output", strategy="adaptive", tolerance=0.05, ga=GAConfig(population=12, generations=15, patience=6, seed=1))
    run_search(ws, options, scorer=synthetic_scorer(ws))
    out = root / "pruned"
    run_apply(ws, ApplyOptions(out=out))
    write_eval(ws, "dense-test", "dense", 0.78)
    write_eval(ws, "pruned-abc-test", str(out), 0.74)
    return ws


def assert_png_has_content(path, min_size=(150, 150)):
    pixels = mpimg.imread(path)
    height, width = pixels.shape[:2]
    assert width >= min_size[0] and height >= min_size[1], (path.name, pixels.shape)
    assert float(pixels[..., :3].std()) > 0.05, f"{path.name} looks blank"


def test_report_has_every_section_and_embeds_valid_pngs(full_ws):
    result = run_report(full_ws, ReportOptions())
    assert result.html == full_ws.report_dir / "report.html"
    page = result.html.read_text()
    for anchor in ("summary", "heatmap", "spectra", "tradeoff", "options"):
        assert f'<section id="{anchor}">' in page
    assert result.sections == {k: "shown" for k in ("summary", "heatmap", "spectra", "tradeoff")}
    names = sorted(p.name for p in result.images)
    assert names == sorted(["metric.png", "kept_heatmap.png", "spectra_output.png", "spectra_svd.png", "tradeoff.png"])
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(names)  # self-contained: every figure is inline
    assert "file://" not in page and 'src="/' not in page
    for path in result.images:
        assert path.parent == full_ws.report_dir
        assert_png_has_content(path)


def test_report_states_scores_sizes_and_options(full_ws):
    page = run_report(full_ws, ReportOptions()).html.read_text()
    plan = json.loads(full_ws.plan_json.read_text())
    assert "pruned (test split)" in page  # the evaluated folder holds this plan's model
    assert "dense (test split)" in page
    assert f"-{plan['params']['removed_fraction_prunable']:.1%}" in page
    assert "The adaptive search over the output fit, tolerance 0.05 (relative to dense)" in page
    # the search options are listed: adaptive runs the local search, so its knobs, not the GA's
    assert "tolerance" in page and "budget=16" in page and "population=12" not in page
    applied = json.loads((full_ws.stage_dir("apply") / "result.json").read_text())
    assert "counted by apply" in page and "not applied yet" not in page
    assert f"-{applied['removed_fraction_model']:.1%}" in page


def test_findings_name_the_kinds_the_task_needs(full_ws):
    plan = json.loads(full_ws.plan_json.read_text())
    kept = {"q": 0.1, "k": 0.2, "down": 1.0, "v": 0.9}
    for m in plan["matrices"].values():
        m["kept"] = kept.get(m["kind"], 0.5)
    plan["matrices"]["model.layers.1.mlp.gate_proj"]["kept"] = 1.0
    most, dense, depth = describe_plan(plan)
    assert most.startswith("The task needs down and v most (kept 100% and 90%") and "q and k least (10% and 20%)" in most
    assert dense.startswith("3 of 14 matrices stay dense: ") and "gate of block 1" in dense
    assert depth.startswith("By block: block 0 keeps")
    blocks, kinds, grid = kept_grid(plan)
    assert blocks == [0, 1] and kinds == ["q", "k", "v", "o", "gate", "up", "down"]
    assert grid[kinds.index("gate"), 1] == 1.0 and grid[kinds.index("q"), 0] == 0.1


def test_uniform_plan_says_there_is_no_bottleneck(tmp_path, tiny_dir):
    ws = base_workspace(tmp_path / "ws", tiny_dir)
    run_search(ws, SearchOptions(method="output", strategy="uniform", tolerance=0.05), scorer=synthetic_scorer(ws))
    result = run_report(ws, ReportOptions(output=tmp_path / "out" / "r.html"))
    assert result.html == tmp_path / "out" / "r.html" and result.html.exists()
    assert result.findings[0].startswith("Uniform plan")
    page = result.html.read_text()
    assert "no evaluation of the pruned model yet" in page and "sieve eval" in page  # eval missing: a note
    assert "not applied yet" in page
    assert result.sections["tradeoff"] == "shown"


def test_uniform_plan_sentence_names_its_kept_fraction_not_a_most_or_least(tmp_path, tiny_dir):
    ws = base_workspace(tmp_path / "ws", tiny_dir)
    plan = run_search(ws, SearchOptions(method="output", strategy="uniform", tolerance=0.05), scorer=synthetic_scorer(ws))
    for i, m in enumerate(plan["matrices"].values()):  # as rank rounding does on SmolLM2 (19.4% to 19.8%)
        m["kept"] -= 0.002 * (i % 3)
    (sentence,) = describe_plan(plan)
    params = [(m["params_after"], m["params_before"]) for m in plan["matrices"].values()]
    weighted = sum(a for a, _ in params) / sum(b for _, b in params)
    assert f"keeps about {weighted:.0%} of its parameters" in sentence
    assert "most" not in sentence and "least" not in sentence


def test_adaptive_sentence_compares_kinds_only_where_they_differ(full_ws):
    plan = json.loads(full_ws.plan_json.read_text())
    for m in plan["matrices"].values():  # two levels: down kept whole, every other kind at half
        m["kept"] = 1.0 if m["kind"] == "down" else 0.5
    first = describe_plan(plan)[0]
    assert first.startswith("The task needs down most (kept 100% of their parameters) and ")
    assert first.endswith("least (50% and 50%).") and "down and" not in first
    for m in plan["matrices"].values():  # equal averages per kind: no kind stands out
        m["kept"] = 0.3 if m["block"] == 0 else 0.7
    assert describe_plan(plan)[0] == "Every kind of matrix keeps 50% of its parameters on average, so no kind stands out."


def test_missing_fit_and_history_are_skipped_with_a_note(tmp_path, tiny_dir):
    ws = base_workspace(tmp_path / "ws", tiny_dir)
    run_search(ws, SearchOptions(method="output", strategy="uniform"), scorer=synthetic_scorer(ws))
    ws.history_jsonl.unlink()
    for method in ("output", "svd"):
        ws.manifest_path(ws.fit_stage(method)).unlink()
    result = run_report(ws, ReportOptions())
    assert result.sections["spectra"].startswith("no finished fit") and "sieve fit" in result.sections["spectra"]
    assert "history.jsonl" in result.sections["tradeoff"]
    page = result.html.read_text()
    assert page.count('class="note"') >= 2
    assert {p.name for p in result.images} == {"metric.png", "kept_heatmap.png"}


def test_no_search_names_the_command(tmp_path, tiny_dir):
    ws = base_workspace(tmp_path / "ws", tiny_dir)
    with pytest.raises(ReportInputError, match=r"sieve search -w .* --strategy"):
        run_report(ws, ReportOptions())


@pytest.mark.parametrize("bad", [dict(dpi=5), dict(output="report.png")])
def test_bad_options_name_the_flag(bad):
    with pytest.raises(InputError, match="--dpi|-o"):
        ReportOptions(**bad)


def test_heatmap_numbers_only_when_few_cells():
    few = heatmap_figure([0, 1], ["q", "down", "up"], np.array([[0.5, 1.0], [0.25, np.nan], [0.0, np.nan]]), "t")
    many = heatmap_figure(list(range(30)), list("qkvoabc"), np.full((7, 30), 0.5), "t")
    assert [t.get_text() for t in few.axes[0].texts] == [".50", "1", ".25", "0"]
    assert len(many.axes[0].texts) == 0


def test_pareto_front_keeps_only_undominated_points():
    points = [(0.0, 1.0), (0.1, 0.9), (0.1, 0.95), (0.2, 0.8), (0.15, 0.7), (0.3, 0.85)]
    assert pareto_front(points) == [(0.0, 1.0), (0.1, 0.95), (0.3, 0.85)]


def test_cli_report(full_ws):
    from sieve_cli.cli import app

    if "report" not in {c.name for c in app.registered_commands}:
        from sieve_cli.commands.report import report

        app.command("report")(report)
    result = CliRunner().invoke(app, ["report", "-w", str(full_ws.root), "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["html"].endswith("report.html") and len(shown["images"]) == 5
    missing = CliRunner().invoke(app, ["report", "-w", str(full_ws.root / "nothing-here")])
    assert missing.exit_code == 1
    assert "sieve search" in missing.output


def test_report_on_the_real_pipeline(tiny_dir, tmp_path):
    """Every stage run for real on the tiny model (`sieve run`), then the report: nothing skipped."""
    from sieve_cli.pipeline import RunOptions, run_pipeline

    from .test_tasks import write_task

    task = write_task(tmp_path, "text_modelling")
    search = SearchOptions(method="output", strategy="adaptive", limit=None, grid_step=0.1,
                           ga=GAConfig(population=4, generations=1, patience=1))
    run = run_pipeline(RunOptions(model=str(tiny_dir), task=str(task), workspace=tmp_path / "ws", out=tmp_path / "pruned",
                                  capture=CaptureOptions(tokens=2000, seq_len=64), split=SplitOptions(max_search=6, max_test=6),
                                  search=search))
    result = run_report(Workspace(run.workspace), ReportOptions())
    assert result.sections == {k: "shown" for k in ("summary", "heatmap", "spectra", "tradeoff")}
    page = result.html.read_text()
    assert "dense (test split)" in page and "pruned (test split)" in page  # apply's folder, evaluated
    assert "counted by apply" in page
    for path in result.images:
        assert_png_has_content(path)


def test_part_rows_put_dense_beside_the_plan_on_each_part():
    from sieve_cli.report.page import part_rows
    from sieve_cli.report.read import Score

    scores = [Score("dense (test split)", 0.80, n=300), Score("pruned (test split)", 0.76, n=300),
              Score("dense (search split)", 0.75, n=200), Score("plan (search split)", 0.75, n=200),
              Score("dense (confirm split)", 0.70, n=150), Score("plan (confirm split)", 0.77, n=150),
              Score("model other (test split)", 0.1)]
    rows, header = part_rows(scores)
    assert header == ("split part", "dense", "plan", "relative change", "examples")
    assert [r[0] for r in rows] == ["search", "confirm", "test"]
    assert rows[2] == ("test", "0.8", "0.76", "-5.0%", 300)
    assert rows[1][3] == "+10.0%" and rows[0][3] == "+0.0%"
    assert part_rows(scores[2:4])[0] == [("search", "0.75", "0.75", "+0.0%", 200)]  # no eval yet: no test row
    rows, header = part_rows([*scores, Score("pruned healed (test split)", 0.84, n=300)])
    assert header[4:] == ("healed", "relative change", "examples")
    assert rows[2] == ("test", "0.8", "0.76", "-5.0%", "0.84", "+5.0%", 300) and rows[0][4:6] == ("", "")
    rows, header = part_rows([*scores, Score("pruned healed (test split)", 0.84, n=300),
                              Score("dense healed (test split)", 0.88, n=300)])
    assert header[4:] == ("healed", "relative change", "dense healed", "healed vs dense healed", "examples")
    assert rows[2][6:] == ("0.88", "-4.5%", 300)  # healing alone gives more than healing the pruned model
