"""`sieve run` end to end on a tiny model: files per stage, a no-op rerun, reruns when the task changes."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from sieve_cli.cli import app
from sieve_cli.options import CaptureOptions, FitOptions, RunOptions, SplitOptions
from sieve_cli.pipeline import run_pipeline
from sieve_cli.search import SearchOptions

from .test_tasks import write_task

STAGE_FILES = [
    "discover/matrices.json",
    "task/task.yaml",
    "task/split.json",
    "capture/stats.zarr",
    "fit/output/factors.json",
    "fit/output/factors-block-000.safetensors",
    "fit/output/spectrum.json",
    "search/plan.json",
    "search/history.jsonl",
    "eval/dense-test/results.json",
]


def options(tiny_dir, tmp_path, task, **overrides):
    base = dict(model=str(tiny_dir), task=str(task), workspace=tmp_path / "ws", out=tmp_path / "pruned",
                capture=CaptureOptions(tokens=2000, seq_len=64), split=SplitOptions(max_search=6, max_test=6),
                search=SearchOptions(method="output", limit=None, grid_step=0.1))
    return RunOptions(fit=FitOptions(method="output"), **{**base, **overrides})


@pytest.fixture
def first_run(tiny_dir, tmp_path):
    task = write_task(tmp_path, "text_modelling")
    opts = options(tiny_dir, tmp_path, task)
    return opts, task, run_pipeline(opts)


def test_run_writes_every_stage_and_reports_dense_and_pruned(first_run, tmp_path):
    opts, _, result = first_run
    ws = tmp_path / "ws"
    for rel in STAGE_FILES:
        assert (ws / rel).exists(), rel
    for stage in ("discover", "task", "capture", "fit/output", "search", "apply"):
        assert json.loads((ws / stage / "manifest.json").read_text())["complete"], stage
    assert [r.stage for r in result.stages] == ["discover", "task", "capture", "fit", "search", "apply", "eval dense", "eval pruned"]
    assert all(r.ran for r in result.stages)
    assert (tmp_path / "pruned" / "sieve.json").exists()
    assert result.dense["split"] == "test" and result.dense["n"] == 6
    assert result.pruned["n"] == 6 and result.pruned["model"] == str((tmp_path / "pruned").resolve())
    # the same test examples were scored for both models
    assert [e["id"] for e in result.dense["per_example"]] == [e["id"] for e in result.pruned["per_example"]]
    assert result.apply["params_after"] == result.plan["params"]["model_after"]


def test_second_run_does_nothing(first_run):
    opts, _, _ = first_run
    again = run_pipeline(opts)
    assert not any(r.ran for r in again.stages), [(r.stage, r.ran) for r in again.stages]


def test_changed_task_reruns_capture_and_downstream_only(first_run, tmp_path):
    opts, task, result = first_run
    body = yaml.safe_load(task.read_text())
    body["doc_to_target"] = "{{ sentence }}"  # a different target text: other calibration data
    task.write_text(yaml.safe_dump(body))
    again = run_pipeline(opts)
    ran = {r.stage: r.ran for r in again.stages}
    assert ran["discover"] is False
    assert all(ran[s] for s in ("task", "capture", "fit", "search", "apply", "eval dense", "eval pruned")), ran


def test_cli_run_prints_the_summary(tiny_dir, tmp_path):
    task = write_task(tmp_path, "text_modelling")
    result = CliRunner().invoke(app, ["run", str(tiny_dir), "--task", str(task), "-w", str(tmp_path / "ws"),
                                      "-o", str(tmp_path / "out"), "--tokens", "2000", "--max-search", "6", "--max-test", "6"])
    assert result.exit_code == 0, result.output
    assert "Dense vs pruned on the test split" in result.output
    assert "pruned model:" in result.output
    # the closing lines name the load a user without sieve runs
    assert f'AutoModelForCausalLM.from_pretrained("{tmp_path / "out"}", trust_remote_code=True)' in result.output


def test_cli_run_bad_task_is_one_line(tiny_dir, tmp_path):
    result = CliRunner().invoke(app, ["run", str(tiny_dir), "--task", str(tmp_path / "nope.yaml"), "-w",
                                      str(tmp_path / "ws"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "nope.yaml" in result.output and "Traceback" not in result.output
