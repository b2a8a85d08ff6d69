"""lm-evaluation-harness scores a pruned folder (through plain transformers) exactly as `sieve eval` does."""

import pytest
import torch

from sieve_cli.evaluate import evaluate, prepare
from sieve_cli.lm_eval_task import write_lm_eval_task
from sieve_cli.pruned import load_pruned, load_tokenizer, plan_ranks, prune_in_memory, save_pruned
from sieve_cli.tasks import SplitOptions

from .test_pruned import IDENTITY, random_plan, svd_factors
from .test_tasks import bind
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


def lm_eval_scores(folder, tasks_dir, name):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(
        model="hf", model_args=f"pretrained={folder},trust_remote_code=True,dtype=float32",
        tasks=[name], task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False), device="cpu", batch_size=1,
        log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
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
