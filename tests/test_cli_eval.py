import json

from typer.testing import CliRunner

from sieve_cli.cli import app

from .test_tasks import write_task

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(map(str, args)))


def test_eval_binds_task_scores_and_reuses(tiny_dir, tmp_path):
    ws = tmp_path / "ws"
    task = write_task(tmp_path, "multiple_choice")
    assert invoke("discover", tiny_dir, "-w", ws).exit_code == 0
    result = invoke("eval", "-w", ws, "--task", task, "--search-size", 4, "--test-size", 8, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["metric"] == "accuracy" and report["n"] == 8 and report["ci_low"] <= report["value"] <= report["ci_high"]
    stored = json.loads((ws / "eval" / "dense-test" / "results.json").read_text())
    assert [e["id"] for e in stored["per_example"]] == json.loads((ws / "task" / "split.json").read_text())["ids"]["test"]
    again = invoke("eval", "-w", ws, "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["reused"] is True
    assert json.loads(again.stdout)["value"] == report["value"]
    table = invoke("eval", "-w", ws, "--split", "search", "--limit", 2)
    assert table.exit_code == 0, table.output
    assert "accuracy" in table.output and "95% CI" in table.output
    assert (ws / "eval" / "dense-search-limit2" / "results.json").exists()


def test_eval_without_task_or_model_gives_one_line(tiny_dir, tmp_path):
    ws = tmp_path / "ws"
    assert invoke("discover", tiny_dir, "-w", ws).exit_code == 0
    result = invoke("eval", "-w", ws)
    assert result.exit_code == 1 and "--task" in result.output and "Traceback" not in result.output
    result = invoke("eval", "-w", ws, "--task", write_task(tmp_path, "text_modelling"), "--search-size", 4,
                    "--test-size", 8, "--model", tmp_path / "nope")
    assert result.exit_code == 1 and "no such file or folder" in result.output


def test_eval_other_model_folder(tiny_dir, tmp_path):
    from .tiny import save_tiny

    other = save_tiny(tmp_path / "other", "llama", seed=1)
    ws = tmp_path / "ws"
    assert invoke("discover", tiny_dir, "-w", ws).exit_code == 0
    task = write_task(tmp_path, "text_modelling")
    dense = invoke("eval", "-w", ws, "--task", task, "--search-size", 4, "--test-size", 8, "--json")
    alt = invoke("eval", "-w", ws, "--model", other, "--json")
    assert dense.exit_code == 0 and alt.exit_code == 0, alt.output
    a, b = json.loads(dense.stdout), json.loads(alt.stdout)
    assert a["extra"]["perplexity"] != b["extra"]["perplexity"] and b["model"].endswith("other")
