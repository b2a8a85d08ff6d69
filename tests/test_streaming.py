"""Streaming evaluation against the in-memory evaluator, on tiny models of three families.

The reference is `evaluate.evaluate` on the fully loaded model (its own forward, its own
batching, and the shared-prefix cache where a few-shot prompt allows it); streaming must give
the same per-example scores, for the dense model, for a factored search candidate, and for a
pruned folder, and the stages must choose it when the memory budget asks for it.
"""

import json
from unittest import mock

import pytest
import torch

from sieve_cli import memory
from sieve_cli.discover import DiscoverOptions, run_discover
from sieve_cli.evaluate import evaluate, prepare, run_eval, stream_evaluate
from sieve_cli.factors import FactorSet
from sieve_cli.matrices import find_matrices, weight_of
from sieve_cli.models import load_model
from sieve_cli.options import CaptureOptions, EvalOptions, RunOptions, SearchOptions, SplitOptions
from sieve_cli.pipeline import run_pipeline
from sieve_cli.pruned import prune_in_memory
from sieve_cli.search import run_search
from sieve_cli.streaming import choose_layout, open_streaming, scored_positions
from sieve_cli.tasks import bind_task
from sieve_cli.workspace import Workspace

from .test_tasks import write_task
from .tiny import BLOCK_FAMILIES, tiny_tokenizer

FAMILIES = BLOCK_FAMILIES  # learned positions; rotary; Gemma 3's sliding + full layers
TOK = tiny_tokenizer()
# float32 on the CPU: the padded and prefix-cached paths differ in summation order only
ATOL = 1e-4


def prepared_part(tmp_path, output_type, **overrides):
    folder = tmp_path / output_type
    folder.mkdir()
    task = write_task(folder, output_type, **overrides)
    bound = bind_task(Workspace(folder / "ws"), task, split=SplitOptions(search=4, test=8))
    return prepare(bound, "test", TOK)


def assert_same_scores(got, reference):
    assert got.metric == reference.metric and got.n == reference.n and got.ids == reference.ids
    assert got.weights == reference.weights
    assert got.per_example == reference.per_example
    assert got.soft == pytest.approx(reference.soft, abs=ATOL)
    for key in ("perplexity", "acc_norm"):
        if key in reference.extra:
            assert got.extra[key] == pytest.approx(reference.extra[key], rel=ATOL)


def svd_factors(model) -> FactorSet:
    """Any factorisation serves: the test asks whether the candidate swapped into each block is the same."""
    factors = FactorSet("svd")
    for m in find_matrices(model):
        U, S, Vh = torch.linalg.svd(weight_of(model.get_submodule(m.name)).detach().double(), full_matrices=False)
        factors.full[m.name] = ((U * S).float(), Vh.float())
    return factors


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("output_type, overrides", [("multiple_choice", {"num_fewshot": 2}), ("text_modelling", {})])
def test_streaming_scores_equal_the_in_memory_evaluator(folders, family, output_type, overrides, tmp_path):
    prepared = prepared_part(tmp_path, output_type, **overrides)
    model, _ = load_model(folders[family])
    reference = evaluate(model, prepared, batch_size=3, show_progress=False)
    runner = open_streaming(folders[family], torch.float32, "cpu")
    got = stream_evaluate(runner, prepared, batch_size=3, show_progress=False)
    assert_same_scores(got, reference)
    assert all(p.device.type == "meta" for p in runner.blocks.parameters())  # every block unloaded again


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tier", ["device", "disk"])
def test_streaming_candidate_equals_the_in_memory_swap(folders, family, tier, tmp_path):
    """A search candidate (ranks per matrix) streamed block by block scores as the same candidate
    swapped into the whole model."""
    prepared = prepared_part(tmp_path, "multiple_choice", num_fewshot=2)
    model, _ = load_model(folders[family])
    factors = svd_factors(model)
    matrices = find_matrices(model)
    ranks = {m.name: (max(1, min(m.out_features, m.in_features) // 4) if i % 3 else None) for i, m in enumerate(matrices)}
    dense = evaluate(model, prepared, batch_size=4, show_progress=False)
    restore = prune_in_memory(model, ranks, factors)
    try:
        reference = evaluate(model, prepared, batch_size=4, show_progress=False)
    finally:
        restore()
    assert max(abs(a - b) for a, b in zip(dense.soft, reference.soft)) > 1e-3  # the candidate is not the dense model
    runner = open_streaming(folders[family], torch.float32, "cpu")
    got = stream_evaluate(runner, prepared, batch_size=4, show_progress=False, ranks=ranks, factors=factors,
                          tier=tier, folder=tmp_path)
    assert_same_scores(got, reference)
    assert not any(tmp_path.glob("sieve-stream-*"))  # the disk tier's hidden states are gone afterwards
    again = stream_evaluate(runner, prepared, batch_size=4, show_progress=False)  # the dense modules were put back
    assert_same_scores(again, dense)


def test_generation_is_refused_with_the_way_out(folders, tmp_path):
    from sieve_cli.errors import InputError

    prepared = prepared_part(tmp_path, "generate_until")
    runner = open_streaming(folders["llama"], torch.float32, "cpu")
    with pytest.raises(InputError, match="--mode memory"):
        stream_evaluate(runner, prepared, show_progress=False)


# ---- the stages ------------------------------------------------------------------------------


def workspace(folder, tmp_path, output_type="multiple_choice", **overrides):
    ws = Workspace(tmp_path / "ws")
    run_discover(ws, DiscoverOptions(str(folder)))
    bind_task(ws, write_task(tmp_path, output_type, **overrides), split=SplitOptions(search=6, test=8, confirm=4))
    return ws


def streaming_minimum(ws, options, what, factors=False) -> int:
    """The least budget the streaming layout accepts (hidden states on disk), from memory.py's formulas."""
    from sieve_cli.evaluate import eval_tokenizer

    bound = bind_task(ws, None)
    parts = [prepare(bound, p, eval_tokenizer(ws, EvalOptions())) for p in ("test",)] if what == "eval" else \
        [prepare(bound, p, eval_tokenizer(ws, EvalOptions())) for p in ("search", "confirm")]
    shape = memory.ModelShape.from_discovery(json.loads(ws.matrices_json.read_text()))
    runs = [memory.scoring_run([len(s.tokens) for s in p.sequences], options.batch_size, "float32", "cpu",
                               scored_positions(p)) for p in parts]
    return max(memory.blockwise_minimum(memory.scoring_streaming(shape, r, what, factors)) for r in runs)


def test_eval_streams_when_the_budget_asks_and_scores_the_same(folders, tmp_path):
    ws = workspace(folders["gemma3_text"], tmp_path, num_fewshot=2)
    in_memory = run_eval(ws, EvalOptions(mode="memory", batch_size=3))
    assert in_memory["layout"]["mode"] == "memory"
    minimum = streaming_minimum(ws, EvalOptions(batch_size=3), "eval")
    streamed = run_eval(ws, EvalOptions(memory_budget=str(minimum), batch_size=3), force=True)  # auto
    assert streamed["layout"] == {**streamed["layout"], "mode": "blockwise", "hidden_cache": "disk"}
    assert [e["score"] for e in streamed["per_example"]] == [e["score"] for e in in_memory["per_example"]]
    assert streamed["value"] == in_memory["value"]
    # the layout is not an input: the same evaluation is up to date whichever way it ran
    assert run_eval(ws, EvalOptions(mode="memory", batch_size=3))["reused"]


def test_a_budget_below_one_block_is_refused_naming_the_minimum(folders, tmp_path):
    from sieve_cli.memory import MemoryBudgetError

    ws = workspace(folders["llama"], tmp_path)
    minimum = streaming_minimum(ws, EvalOptions(), "eval")
    with pytest.raises(MemoryBudgetError, match="--memory-budget of at least") as refused:
        run_eval(ws, EvalOptions(memory_budget=str(minimum - 1)))
    assert "--dtype bfloat16" in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(MemoryBudgetError, match="--mode blockwise"):
        run_eval(ws, EvalOptions(mode="memory", memory_budget=str(minimum)))


def test_layout_prefers_one_device_then_the_spread_then_streaming(folders, tmp_path):
    """With several devices (faked: this machine has none), a model too large for one GPU but not
    for all of them is spread with device_map=auto; too large for all, it streams."""
    ws = workspace(folders["llama"], tmp_path)
    bound = bind_task(ws, None)
    parts = [prepare(bound, "test", TOK)]
    one = choose_layout(ws, "auto", "1TiB", "cuda:0", "float32", parts, 4, "eval")
    assert one.mode == "memory" and one.max_memory is None
    shape = memory.ModelShape.from_discovery(json.loads(ws.matrices_json.read_text()))
    run = memory.scoring_run([len(s.tokens) for s in parts[0].sequences], 4, "float32", "cuda:0",
                             scored_positions(parts[0]))
    need = memory.scoring_in_memory(shape, run, "eval", False).total
    budget = memory.blockwise_minimum(memory.scoring_streaming(shape, run, "eval", False))
    assert need == one.estimate.total and budget < need
    for spread, expected in ((need, "spread"), (need - 1, "blockwise")):
        limits = {0: budget, 1: spread - budget - 10, "cpu": 10}
        with mock.patch.object(memory, "spread_memory", return_value=limits):
            layout = choose_layout(ws, "auto", str(budget), "cuda:0", "float32", parts, 4, "eval")
        assert layout.mode == expected
        assert layout.max_memory == (limits if expected == "spread" else None)


def test_search_streaming_gives_the_same_plan_and_history(folders, tmp_path):
    from sieve_cli.capture import run_capture
    from sieve_cli.fit import FitOptions, run_fit

    ws = workspace(folders["llama"], tmp_path, num_fewshot=2)
    run_capture(ws, CaptureOptions(tokens=600, seq_len=64))
    run_fit(ws, FitOptions(method="output"))
    plans, histories = {}, {}
    minimum = streaming_minimum(ws, SearchOptions(method="output"), "search", factors=True)
    for mode, budget in (("memory", None), ("auto", str(minimum))):
        plan = run_search(ws, SearchOptions(method="output", mode=mode, memory_budget=budget, grid_step=0.1, allow_chance=True,
                                            tolerance=0.2), force=True)
        summary = json.loads(ws.manifest_path("search").read_text())["summary"]
        assert summary["layout"]["mode"] == ("memory" if mode == "memory" else "blockwise")
        plans[mode] = {name: m["rank"] for name, m in plan["matrices"].items()}
        histories[mode] = [json.loads(line) for line in ws.history_jsonl.read_text().splitlines()]
    assert plans["auto"] == plans["memory"]
    assert len(histories["auto"]) == len(histories["memory"])
    for a, b in zip(histories["auto"], histories["memory"]):
        assert a["params_after"] == b["params_after"] and a["acceptable"] == b["acceptable"]
        assert a["metric"] == pytest.approx(b["metric"], abs=1e-9) and a["lower"] == pytest.approx(b["lower"], abs=ATOL)


# ---- sieve run: device, dtype and layout reach every stage -------------------------------------


def test_run_passes_device_dtype_and_layout_to_every_stage(tiny_dir, tmp_path):
    """`cpu:0` is a real device that no default spells: each stage must have been handed it, and the
    stages that load the model must have loaded it there, in discover's dtype."""
    import traceback

    import sieve_cli.discover as discover
    import sieve_cli.evaluate as evaluate_module
    import sieve_cli.pipeline as pipeline

    loads, handed = [], []
    real_load, real_pruned = discover.load_model, evaluate_module.load_pruned

    def load_model_recorded(source, dtype="float32", device="cpu", max_memory=None):
        stage = next(f.name for f in reversed(traceback.extract_stack()) if f.name.startswith("run_"))
        loads.append((stage, device, dtype))
        return real_load(source, dtype, device, max_memory)

    def load_pruned_recorded(path, device="cpu", dtype=None):
        loads.append(("run_eval pruned", str(device), dtype))
        return real_pruned(path, device=device, dtype=dtype)

    def handing(name):
        real = getattr(pipeline, name)

        def stage(ws, options, *args, **kwargs):
            handed.append((name, options.device, options.mode, options.memory_budget))
            return real(ws, options, *args, **kwargs)

        return stage

    task = write_task(tmp_path, "multiple_choice")
    options = RunOptions(model=str(tiny_dir), task=str(task), workspace=tmp_path / "ws", out=tmp_path / "pruned",
                         capture=CaptureOptions(tokens=600, seq_len=64), split=SplitOptions(max_search=6, max_test=6),
                         search=SearchOptions(method="output", grid_step=0.2, allow_chance=True), device="cpu:0", dtype="bfloat16",
                         memory_budget="64GiB")
    stages = ("run_capture", "run_fit", "run_search", "run_eval")
    with mock.patch.object(discover, "load_model", load_model_recorded), \
            mock.patch.object(evaluate_module, "load_pruned", load_pruned_recorded), \
            mock.patch.multiple(pipeline, **{name: handing(name) for name in stages}):
        run_pipeline(options)
    assert [h[0] for h in handed] == ["run_capture", "run_fit", "run_search", "run_eval", "run_eval"]
    assert all(h[1:] == ("cpu:0", "auto", "64GiB") for h in handed)
    # fit reads the weights on the host and moves each matrix to its device; apply writes float32 files
    assert [(s, d) for s, d, _ in loads] == [("run_capture", "cpu:0"), ("run_fit", "cpu"), ("run_search", "cpu:0"),
                                             ("run_apply", "cpu"), ("run_eval", "cpu:0"), ("run_eval pruned", "cpu:0")]
    dtypes = {s: d for s, _, d in loads}
    assert dtypes["run_capture"] == dtypes["run_search"] == dtypes["run_eval"] == "bfloat16"  # discover's dtype
    ws = Workspace(tmp_path / "ws")
    assert json.loads(ws.manifest_path("search").read_text())["inputs"]["options"]["device"] == "cpu:0"


def test_run_mode_reaches_capture_search_and_eval(tiny_dir, tmp_path):
    task = write_task(tmp_path, "multiple_choice")
    options = RunOptions(model=str(tiny_dir), task=str(task), workspace=tmp_path / "ws", out=tmp_path / "pruned",
                         capture=CaptureOptions(tokens=600, seq_len=64), split=SplitOptions(max_search=6, max_test=6),
                         search=SearchOptions(method="output", grid_step=0.2, allow_chance=True), mode="blockwise")
    assert {options.capture.mode, options.fit.mode, options.search.mode, options.eval.mode} == {"blockwise"}
    result = run_pipeline(options)
    ws = Workspace(tmp_path / "ws")
    assert json.loads(ws.manifest_path("capture").read_text())["summary"]["mode"] == "blockwise"
    assert json.loads(ws.manifest_path("search").read_text())["summary"]["layout"]["mode"] == "blockwise"
    assert result.dense["layout"]["mode"] == "blockwise" and result.pruned["layout"]["mode"] == "blockwise"
    # the pruned folder streamed block by block scores as the pruned folder loaded whole
    whole = run_eval(ws, EvalOptions(model=str(tmp_path / "pruned"), mode="memory"), force=True)
    assert [e["score"] for e in whole["per_example"]] == [e["score"] for e in result.pruned["per_example"]]
    assert whole["layout"]["mode"] == "memory"


@pytest.mark.slow
def test_smollm2_streaming_eval_equals_in_memory(smollm2_gguf, data_root, tmp_path):
    """The real model (tied head, few-shot sst2 scored through the prefix cache in memory):
    the eval stage streamed block by block gives the same per-example scores."""
    ws = Workspace(tmp_path / "ws")
    run_discover(ws, DiscoverOptions(model=str(smollm2_gguf)))
    bind_task(ws, "examples/tasks/sst2.yaml", data_root=str(data_root))
    reports = {mode: run_eval(ws, EvalOptions(mode=mode, limit=24, batch_size=8), force=True)
               for mode in ("memory", "blockwise")}
    assert reports["blockwise"]["layout"]["mode"] == "blockwise"
    assert [e["score"] for e in reports["blockwise"]["per_example"]] == [e["score"] for e in reports["memory"]["per_example"]]
    assert reports["blockwise"]["value"] == reports["memory"]["value"]


def test_run_cli_hands_device_layout_and_budget_to_every_stage(tmp_path):
    from typer.testing import CliRunner

    import sieve_cli.pipeline as pipeline
    from sieve_cli.cli import app

    seen = []
    with mock.patch.object(pipeline, "run_pipeline", side_effect=lambda options, **_: seen.append(options) or 1 / 0):
        CliRunner().invoke(app, ["run", "model-folder", "-o", str(tmp_path / "out"), "--device", "cpu:0",
                                 "--mode", "blockwise", "--memory-budget", "2GiB"])
    (options,) = seen
    for stage in (options.capture, options.fit, options.search, options.eval):
        assert (stage.device, stage.mode, stage.memory_budget) == ("cpu:0", "blockwise", "2GiB")


def test_eval_cli_prints_the_layout_and_refuses_a_tiny_budget_in_one_line(folders, tmp_path):
    from typer.testing import CliRunner

    from sieve_cli.cli import app

    ws = workspace(folders["llama"], tmp_path)
    runner = CliRunner()
    streamed = runner.invoke(app, ["eval", "-w", str(ws.root), "--mode", "blockwise"])
    assert streamed.exit_code == 0, streamed.output
    assert "layout: streamed block by block" in " ".join(streamed.output.split())
    refused = runner.invoke(app, ["eval", "-w", str(ws.root), "--memory-budget", "1KiB", "--force"])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "--memory-budget of at least" in " ".join(refused.output.split())
