"""The evaluator: a task metric on one split part, in memory (`prepare` + `evaluate`) or as stage `eval`.

`prepare` (`prepared.py`) tokenises a part once into scoring sequences; `evaluate` runs them through a
model (`scoring.score_sequences`: length-sorted batches, every sequence scored exactly as it would be
alone, only the logits of scored positions computed, a few-shot prefix shared by all sequences run once
per call and reused from the KV cache) and turns the scores into a metric (`metrics.py`, intervals in
`intervals.py`); `generate_until` tasks generate (`generation.py`). No disk I/O in any of them, so
`search` can call `evaluate` many times. `run_eval` is the stage: it loads the workspace's model or a
pruned folder and records the result. The names of those modules stay importable from here.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from .discover import check_model_unchanged, load_workspace_model, workspace_model_source
from .errors import InputError
from .files import read_json, sha256_bytes, write_json_atomic
from .generation import cut_at_stop, evaluate_generation, generate_greedy, normalise_answer  # noqa: F401
from .heal import healed_dense_model
from .intervals import Z95, ratio_interval, wilson_interval  # noqa: F401
from .metrics import EvalResult, multiple_choice_result, result_of, text_modelling_result  # noqa: F401
from .models import check_fits_positions, load_model, model_identity, safetensors_folder, torch_dtype
from .models import load_tokenizer as load_model_tokenizer
from .options import EvalOptions, heal_recipe_with
from .prepared import PreparedSplit, longest_input, prepare, split_tokens  # noqa: F401
from .pruned import SIEVE_JSON, load_pruned, load_tokenizer, read_sieve_json, verify_pruned_folder
from .scoring import (  # noqa: F401  (the scoring names stay importable from here, as before the split)
    MIN_SHARED_PREFIX,
    Sequence,
    Span,
    batches_by_length,
    cache_argument,
    device_of,
    left_pad,
    null_bar,
    returned_cache,
    score_sequences,
    shared_prefix_length,
)
from .streaming import choose_layout, open_streaming, open_streaming_pruned, stream_scores
from .tasks import bind_task
from .workspace import Stage, Workspace

log = logging.getLogger(__name__)


# ---- evaluation --------------------------------------------------------------------------------------


def evaluate(
    model, prepared: PreparedSplit, batch_size: int = 16, max_batch_tokens: int = 8192, show_progress: bool = True,
    reuse_prefix: bool = True,
) -> EvalResult:
    """The task metric of `model` on a prepared split part; no disk I/O, runs on the model's device.

    The same prepared split, batch size and weights always give the same numbers. `reuse_prefix=False`
    runs every sequence whole (the evaluator before prefix caching; same numbers within float rounding).
    """
    if not prepared.examples:
        raise InputError(f"the {prepared.part} part of task {prepared.task} has no examples to score")
    was_training = model.training
    model.eval()
    try:
        if prepared.output_type == "generate_until":
            return evaluate_generation(model, prepared, batch_size, show_progress)
        scores = score_sequences(model, prepared.sequences, prepared.pad_id, batch_size, max_batch_tokens, show_progress, reuse_prefix)
    finally:
        model.train(was_training)
    return result_of(prepared, scores)


def stream_evaluate(runner, prepared: PreparedSplit, batch_size: int = 16, max_batch_tokens: int = 8192,
                    show_progress: bool = True, ranks=None, factors=None, tier: str = "device",
                    folder: Path | None = None) -> EvalResult:
    """`evaluate` for a model opened by `streaming.open_streaming` (one block in memory at a time), with
    a search candidate's `ranks` and `factors` swapped into each block; same batches, same numbers
    within float rounding. `tier`/`folder`: where the hidden states between blocks live."""
    if not prepared.examples:
        raise InputError(f"the {prepared.part} part of task {prepared.task} has no examples to score")
    if prepared.output_type == "generate_until":
        raise InputError(
            f"task {prepared.task} generates text, which streaming evaluation cannot do (every generated token "
            f"needs every block); give the model the memory it needs (--mode memory, --memory-budget, "
            f"--dtype bfloat16) or score a log-likelihood task"
        )
    scores = stream_scores(runner, prepared.sequences, prepared.pad_id, batch_size, max_batch_tokens, show_progress,
                           ranks, factors, tier, folder)
    return result_of(prepared, scores)


# ---- stage eval ----------------------------------------------------------------------------------------


def run_label(options: EvalOptions) -> str:
    """Each (model, split, limit) gets its own folder under WS/eval, so dense and pruned results coexist."""
    if options.model is None:
        who = f"dense-healed{options.heal_dense}" if options.heal_dense else "dense"
    else:
        path = Path(options.model).expanduser().resolve()
        who = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.name)[:40] + "-" + sha256_bytes(str(path).encode())[:8]
    return f"{who}-{options.split}" + (f"-limit{options.limit}" if options.limit else "")


def load_eval_model(ws: Workspace, options: EvalOptions, max_memory: dict | None = None):
    """(model, tokenizer, identity): the pruned model folder if it has sieve.json, any model folder, or the
    dense model; `max_memory` spreads a dense model over devices (device_map=auto)."""

    if options.model is None:
        model, tokenizer = load_workspace_model(ws, options.dtype, options.device, max_memory)
        return model, tokenizer, {"kind": "dense"}
    folder = eval_folder(options)
    if (folder / SIEVE_JSON).exists():

        dtype = torch_dtype(options.dtype) if options.dtype else None
        model = load_pruned(folder, device=options.device, dtype=dtype)
        tokenizer = load_tokenizer(folder)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.eval()
    else:
        model, tokenizer = load_model(folder, options.dtype or "float32", options.device, max_memory)
    return model, tokenizer, model_identity(folder)


def eval_folder(options: EvalOptions) -> Path:
    folder = Path(options.model).expanduser()
    if not folder.is_dir():
        raise InputError(f"--model {folder} is not a folder; pass the output folder of `sieve apply` or a model folder")
    return folder


def eval_tokenizer(ws: Workspace, options: EvalOptions):
    """The tokenizer of the model `run_eval` scores, loaded without its weights."""
    if options.model is None:
        return load_model_tokenizer(workspace_model_source(ws))
    folder = eval_folder(options)
    if not (folder / SIEVE_JSON).exists():
        return load_model_tokenizer(folder)
    verify_pruned_folder(folder)  # before anything of the folder is read
    tokenizer = load_tokenizer(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def eval_dtype(ws: Workspace, options: EvalOptions) -> str:
    """The dtype the scored model computes in: asked, else a pruned folder's stored one, else discover's."""
    if options.dtype:
        return options.dtype
    if options.model is not None and (eval_folder(options) / SIEVE_JSON).exists():
        return read_sieve_json(eval_folder(options)).get("dtype", "float32")
    if options.model is not None:
        return "float32"
    return ws.require(Stage.DISCOVER)["inputs"]["options"]["dtype"]


def open_eval_streaming(ws: Workspace, options: EvalOptions, dtype: str):
    """The scored model opened for streaming (`streaming.py`): one block in memory at a time."""
    if options.model is None:
        source = check_model_unchanged(ws)["inputs"]["options"]["model"]
        return open_streaming(safetensors_folder(source), torch_dtype(dtype), options.device)
    folder = eval_folder(options)
    if (folder / SIEVE_JSON).exists():
        return open_streaming_pruned(folder, options.device, dtype)
    return open_streaming(folder, torch_dtype(dtype), options.device)


def run_eval(ws: Workspace, options: EvalOptions, force: bool = False) -> dict:
    """Evaluate the workspace's model (or `options.model`) on a split part; writes WS/eval/<run>/.

    The model is loaded whole on the device, spread over the devices, or streamed block by block,
    as `--mode` and the memory budget decide (`streaming.choose_layout`; the estimate is logged).
    """
    label = run_label(options)
    stage = Stage.eval(label)
    bound = bind_task(ws, None)
    upstream = ws.upstream_hashes(Stage.DISCOVER, Stage.TASK)

    identity = {"kind": "dense"} if options.model is None else model_identity(Path(options.model).expanduser())
    inputs = {"options": options.recorded(), "upstream": upstream, "model": identity}
    results_path = ws.eval_results(label)
    if not ws.begin(stage, inputs, force):
        log.info("eval %s is up to date; showing the stored result", label)
        return read_json(results_path) | {"reused": True}
    tokenizer = eval_tokenizer(ws, options)
    prepared = prepare(bound, options.split, tokenizer, options.limit, options.max_length)
    dtype = eval_dtype(ws, options)
    pruned_folder = options.model is not None and (eval_folder(options) / SIEVE_JSON).exists()
    layout = choose_layout(ws, options.mode, options.memory_budget, options.device, dtype, [prepared],
                           options.batch_size, "eval", can_spread=not pruned_folder)
    if layout.mode == "blockwise":
        runner = open_eval_streaming(ws, options, dtype)
        check_fits_positions(runner.model, longest_input(prepared), "--max-length")
        start = time.perf_counter()
        result = stream_evaluate(runner, prepared, options.batch_size, tier=layout.tier, folder=ws.eval_dir)
    else:
        model, _, _ = load_eval_model(ws, options, layout.max_memory)
        if options.heal_dense:
            recipe = heal_recipe_with(options.heal_recipe, options.heal_dense, options.device, options.dtype)
            model = healed_dense_model(ws, model, tokenizer, recipe)
        check_fits_positions(model, longest_input(prepared), "--max-length")
        start = time.perf_counter()
        result = evaluate(model, prepared, options.batch_size)
    seconds = time.perf_counter() - start
    report = {
        "run": label,
        "task": bound.name,
        "output_type": bound.output_type,
        "split": options.split,
        "model": ("dense healed" if options.heal_dense else "dense") if options.model is None
                 else str(Path(options.model).expanduser().resolve()),
        "metric": result.metric,
        "value": result.value,
        "ci_low": result.ci_low,
        "ci_high": result.ci_high,
        "n": result.n,
        "extra": result.extra,
        "seconds": seconds,
        "input_tokens_per_second": prepared.input_tokens / seconds if seconds > 0 else None,
        "per_example": [{"id": i, "score": s, "weight": w} for i, s, w in zip(result.ids, result.per_example, result.weights)],
        "layout": layout.note(),
    }
    record_eval(ws, label, report, inputs)
    return report | {"reused": False}


def record_eval(ws: Workspace, label: str, report: dict, inputs: dict) -> None:
    """Write WS/eval/<label>/results.json and finish its stage (the one writer of eval results)."""
    ws.begin(Stage.eval(label), inputs, force=True)
    write_json_atomic(ws.eval_results(label), report)
    summary = {k: report.get(k) for k in ("task", "split", "model", "metric", "value", "ci_low", "ci_high", "n")}
    ws.finish(Stage.eval(label), inputs, [ws.eval_results(label)], summary)
