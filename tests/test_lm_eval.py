"""lm-evaluation-harness scores a pruned folder (through plain transformers) exactly as `sieve eval` does."""

import json
import shlex

import pytest
import torch
from typer.testing import CliRunner

from sieve_cli.cli import app
from sieve_cli.evaluate import evaluate, prepare
from sieve_cli.lm_eval_task import write_lm_eval_task
from sieve_cli.modeling import MODELING_FILE
from sieve_cli.pruned import load_pruned, load_tokenizer, plan_ranks, prune_in_memory, save_pruned
from sieve_cli.tasks import SplitOptions

from .test_pruned import IDENTITY, random_plan, svd_factors
from .test_tasks import bind, write_task
from .tiny import tiny_model, tiny_tokenizer

lm_eval = pytest.importorskip("lm_eval")


@pytest.fixture
def pruned(tmp_path):
    model = tiny_model("llama")
    plan = random_plan(model, seed=3)
    prune_in_memory(model, plan_ranks(plan), svd_factors(model))
    tokenizer = tiny_tokenizer()
    model.config.pad_token_id, model.config.eos_token_id = 0, 1
    save_pruned(model, tmp_path / "out", plan, IDENTITY, tokenizer=tokenizer)
    return tmp_path / "out"


def lm_eval_scores(folder, tasks_dir, name, model_args=None, device="cpu", batch_size=1):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(
        model="hf", model_args=model_args or f"pretrained={folder},trust_remote_code=True,dtype=float32",
        tasks=[name], task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False), device=device,
        batch_size=batch_size, log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
        fewshot_random_seed=0,
    )
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    return out["results"][name], samples


def test_lm_eval_on_the_exported_task_equals_sieve_eval_example_by_example(pruned, tmp_path):
    bound, _ = bind(tmp_path, "multiple_choice", split=SplitOptions(search=4, test=10), num_fewshot=2,
                    description="Answer yes or no.")
    model, tokenizer = load_pruned(pruned), load_tokenizer(pruned)
    prepared = prepare(bound, "test", tokenizer)
    ours = evaluate(model, prepared, batch_size=4, show_progress=False)

    name = write_lm_eval_task(bound, "test", tmp_path / "lm_eval_tasks")
    results, samples = lm_eval_scores(pruned, tmp_path / "lm_eval_tasks", name)

    assert [s["doc"]["id"] for s in samples] == ours.ids  # the same examples, in the same order
    assert [s["acc"] for s in samples] == ours.per_example
    assert results["acc,none"] == ours.value and results["acc_norm,none"] == ours.extra["acc_norm"]
    # lm-eval scored sieve's strings (shots and description included) with the folder's own model
    for sample, example in zip(samples, prepared.examples):
        assert [a for a in sample["arguments"]] == [(example.context, " " + c) for c in example.choices]
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            assert resp[0][0] == pytest.approx(direct_loglikelihood(model, tokenizer, context, continuation), abs=1e-4)


def direct_loglikelihood(model, tokenizer, context, continuation) -> float:
    """Summed log-probability of the continuation's tokens, one unpadded sequence in float64."""
    ctx, cont = tokenizer.encode(context), tokenizer.encode(context + continuation)[len(tokenizer.encode(context)):]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def flag_values(command: str) -> dict[str, str]:
    """--flag value pairs of a printed shell command."""
    words = shlex.split(command)
    return {w: words[i + 1] for i, w in enumerate(words) if w.startswith("--")}


@pytest.fixture
def ws_with_task(tiny_dir, tmp_path):
    ws = tmp_path / "ws"
    task = write_task(tmp_path, "multiple_choice", num_fewshot=2, description="Answer yes or no.")
    assert invoke("discover", tiny_dir, "-w", ws).exit_code == 0
    return ws, task


@pytest.mark.parametrize("which", ["pruned", "dense"])
def test_cli_eval_exports_the_examples_it_scored_and_its_lm_eval_command_scores_them_alike(which, pruned,
                                                                                          ws_with_task, tmp_path):
    ws, task = ws_with_task
    model = ["--model", pruned] if which == "pruned" else ["--limit", 7]
    result = invoke("eval", "-w", ws, "--task", task, "--search-size", 4, "--test-size", 10, *model,
                    "--lm-eval-yaml", tmp_path / "lm_eval_tasks", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    exported = report["lm_eval"]
    flags = flag_values(exported["command"])
    assert flags["--model"] == "hf" and flags["--include_path"] == str((tmp_path / "lm_eval_tasks").resolve())
    if which == "pruned":
        assert "trust_remote_code=True" in flags["--model_args"]
    # run what the command says (in process: the same arguments lm_eval's command line passes on)
    results, samples = lm_eval_scores(None, flags["--include_path"], flags["--tasks"], model_args=flags["--model_args"],
                                      device=flags["--device"], batch_size=int(flags["--batch_size"]))
    stored = json.loads((ws / "eval" / report["run"] / "results.json").read_text())
    assert len(samples) == report["n"] == (10 if which == "pruned" else 7)
    assert [s["doc"]["id"] for s in samples] == [e["id"] for e in stored["per_example"]]  # the same examples
    assert [s["acc"] for s in samples] == [e["score"] for e in stored["per_example"]]
    assert results["acc,none"] == report["value"] and results["acc_norm,none"] == report["extra"]["acc_norm"]

    table = invoke("eval", "-w", ws, *model, "--lm-eval-yaml", tmp_path / "lm_eval_tasks")
    assert table.exit_code == 0, table.output
    assert exported["command"] in table.output.splitlines()[-1]  # printed whole, on one line


def test_folder_without_its_modeling_file_is_one_line_for_lm_eval_and_still_scored_by_sieve(pruned, ws_with_task,
                                                                                            tmp_path):
    ws, task = ws_with_task
    (pruned / MODELING_FILE).unlink()
    result = invoke("eval", "-w", ws, "--task", task, "--search-size", 4, "--test-size", 10, "--model", pruned,
                    "--lm-eval-yaml", tmp_path / "lm_eval_tasks")
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and MODELING_FILE in errors[0], result.output
    assert "trust_remote_code" in errors[0] and "sieve_cli.load_pruned" in errors[0]
    assert not (tmp_path / "lm_eval_tasks").exists() and not (ws / "eval").exists()  # refused before any work

    scored = invoke("eval", "-w", ws, "--model", pruned)  # sieve's own loader needs no modeling file
    assert scored.exit_code == 0, scored.output
    assert "trust_remote_code" in scored.output and "sieve_cli.load_pruned" in scored.output  # the warning
