"""The evaluator: a task metric on one split part, in memory (`prepare` + `evaluate`) or as stage `eval`.

`prepare` tokenises a part once into scoring sequences; `evaluate` runs them through a model
(`scoring.score_sequences`: length-sorted batches, every sequence scored exactly as it would be
alone, only the logits of scored positions computed, a few-shot prefix shared by all sequences
run once per call and reused from the KV cache). Generation (`generate_until`) runs whole
prompts, left-padded. No disk I/O in either, so `search` can call `evaluate` many times.

Metrics (value is always higher-is-better):
- multiple_choice: accuracy of the choice with the highest summed log-likelihood
  (lm-eval `acc`); `acc_norm` (log-likelihood per character of the choice) in `extra`.
- generate_until: exact match of the greedy generation, cut at the first stop string.
- text_modelling: next-token top-1 accuracy over the target's tokens (token-weighted);
  perplexity = exp(mean negative log-likelihood per target token) in `extra`.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import progress
from .discover import check_model_unchanged, load_workspace_model, workspace_model_source
from .errors import InputError
from .files import read_json, sha256_bytes, write_json_atomic
from .models import check_fits_positions, load_model, model_identity, safetensors_folder, torch_dtype
from .models import load_tokenizer as load_model_tokenizer
from .options import EvalOptions
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
from .tasks import BoundTask, Example, bind_task
from .workspace import Stage, Workspace

log = logging.getLogger(__name__)

Z95 = 1.959963984540054


# ---- prepared sequences ---------------------------------------------------------------------


@dataclass
class PreparedSplit:
    """One split part, tokenised once; reusable across models that share the tokenizer."""

    task: str
    part: str
    output_type: str
    examples: list[Example]
    sequences: list[Sequence]  # scoring sequences (multiple_choice, text_modelling)
    prompts: list[tuple[int, ...]] = field(default_factory=list)  # generate_until contexts
    until: tuple[str, ...] = ()
    max_gen_toks: int = 0
    target_delimiter: str = " "
    pad_id: int = 0
    eos_id: int | None = None
    tokenizer: Any = None  # kept for decoding generations only

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.examples]

    @property
    def input_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.sequences) + sum(len(p) for p in self.prompts)


def prepare(bound: BoundTask, part: str, tokenizer, limit: int | None = None, max_length: int = 1024) -> PreparedSplit:
    """Tokenise one part of the bound task (the first `limit` examples) for `evaluate`."""
    if limit is not None and limit < 1:
        raise InputError("--limit must be >= 1")
    if max_length < 8:
        raise InputError("--max-length must be >= 8 tokens")
    examples = bound.examples(part)[:limit]
    task = bound.task
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    prepared = PreparedSplit(
        task=task.name, part=part, output_type=task.output_type, examples=examples, sequences=[],
        target_delimiter=task.target_delimiter, pad_id=pad_id, eos_id=tokenizer.eos_token_id,
    )
    if task.output_type == "generate_until":
        budget = max(1, max_length - task.max_gen_toks)
        prepared.prompts = [tuple(tokenizer.encode(e.context)[-budget:]) for e in examples]
        prepared.until, prepared.max_gen_toks, prepared.tokenizer = task.until, task.max_gen_toks, tokenizer
        return prepared
    for index, example in enumerate(examples):
        prepared.sequences.extend(_sequences_of(index, example, task.target_delimiter, task.output_type, tokenizer, max_length))
    return prepared


def longest_input(prepared: PreparedSplit) -> int:
    """Tokens of the longest sequence the model will see (a generation's prompt plus what it may add)."""
    if prepared.output_type == "generate_until":
        return max(map(len, prepared.prompts), default=0) + prepared.max_gen_toks
    return max((len(s.tokens) for s in prepared.sequences), default=0)


def split_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval does: encode the whole, cut at the context's length.

    Encoding the whole keeps merges across the boundary as the model saw them in training;
    where the context's own encoding is not a prefix of the whole, the two are encoded apart.
    """
    if not context:
        whole = tokenizer.encode(continuation)
        return whole[:1], whole[1:]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx) :]
    return ctx, tokenizer.encode(continuation, add_special_tokens=False)


def _fit(ctx: list[int], cont: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Trim to at most max_length + 1 tokens: the context's left first (keeping one), then the continuation's tail."""
    excess = len(ctx) + len(cont) - (max_length + 1)
    if excess > 0:
        drop = min(excess, max(len(ctx) - 1, 0))
        ctx, excess = ctx[drop:], excess - drop
    if excess > 0:
        cont = cont[: len(cont) - excess]
    return ctx, cont


def _sequences_of(index: int, example: Example, delimiter: str, output_type: str, tokenizer, max_length: int) -> list[Sequence]:
    if output_type == "text_modelling":
        sep = delimiter if example.context else ""
        ctx, cont = _fit(*split_tokens(tokenizer, example.context, sep + example.target), max_length)
        full = ctx + cont
        return [Sequence(index, tuple(full[:-1]), (Span(0, tuple(cont)),))] if cont else []
    # multiple_choice: choices whose model input is identical (one-token continuations of one context)
    # share a single sequence, so a yes/no task costs one forward per example, not one per choice
    grouped: dict[tuple[int, ...], list[Span]] = {}
    for choice, text in enumerate(example.choices):
        ctx, cont = _fit(*split_tokens(tokenizer, example.context, delimiter + text), max_length)
        full = ctx + cont
        grouped.setdefault(tuple(full[:-1]), []).append(Span(choice, tuple(cont)))
    return [Sequence(index, tokens, tuple(spans)) for tokens, spans in grouped.items()]


# ---- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalResult:
    """A metric on one split part. value = sum(w * s) / sum(w) over per_example scores s and weights w."""

    metric: str
    value: float
    ci_low: float
    ci_high: float
    n: int
    extra: dict
    per_example: list[float]
    weights: list[float] = field(default_factory=list)  # tokens per example for text modelling, else 1
    ids: list[str] = field(default_factory=list)
    # a low-noise per-example signal for paired comparisons (higher is better): the log-probability of
    # the gold choice among the choices, or the mean log-likelihood per target token; none for generation
    soft: list[float] = field(default_factory=list)


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sane at 0%, 100% and small n)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def ratio_interval(correct: list[float], counts: list[float], z: float = Z95) -> tuple[float, float]:
    """95% interval of a token-weighted accuracy sum(c)/sum(n), examples as clusters (delta method).

    Tokens of one example are not independent; treating them so would make the interval far too narrow.
    """
    m, total = len(counts), sum(counts)
    if m < 2 or total == 0:
        return 0.0, 1.0
    r = sum(correct) / total
    var = m / (m - 1) * sum((c - r * n) ** 2 for c, n in zip(correct, counts)) / total**2
    half = z * math.sqrt(var)
    return max(0.0, r - half), min(1.0, r + half)


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
            return _evaluate_generation(model, prepared, batch_size, show_progress)
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


def result_of(prepared: PreparedSplit, scores) -> EvalResult:
    """The metric of a scoring task from its per-sequence span scores (`score_sequences`' output,
    or the streaming evaluator's)."""
    if prepared.output_type == "multiple_choice":
        return _multiple_choice_result(prepared, scores)
    return _text_modelling_result(prepared, scores)


def _multiple_choice_result(prepared: PreparedSplit, scores) -> EvalResult:
    n = len(prepared.examples)
    loglik = [[-math.inf] * len(e.choices) for e in prepared.examples]
    for seq, spans in zip(prepared.sequences, scores):
        for span, (lp, _, _) in zip(seq.spans, spans):
            loglik[seq.example][span.choice] = lp
    acc, acc_norm, soft = [], [], []
    for e, ll in zip(prepared.examples, loglik):
        lengths = [len(prepared.target_delimiter + c) for c in e.choices]
        acc.append(float(_argmax(ll) == e.gold))
        soft.append(_log_softmax_at(ll, e.gold))
        acc_norm.append(float(_argmax([l / max(n_, 1) for l, n_ in zip(ll, lengths)]) == e.gold))
    value = sum(acc) / n
    low, high = wilson_interval(sum(acc), n)
    extra = {
        "acc_norm": sum(acc_norm) / n,
        "acc_norm_ci": list(wilson_interval(sum(acc_norm), n)),
        "chance": sum(1 / len(e.choices) for e in prepared.examples) / n,
        # always giving the most frequent gold index: the constant-answer baseline a model must beat
        "majority": max(Counter(e.gold for e in prepared.examples).values()) / n,
        "input_tokens": prepared.input_tokens,
    }
    return EvalResult("accuracy", value, low, high, n, extra, acc, [1.0] * n, prepared.ids, soft)


def _log_softmax_at(values: list[float], index: int) -> float:
    top = max(values)
    return values[index] - (top + math.log(sum(math.exp(v - top) for v in values)))


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties go to the first choice


def _text_modelling_result(prepared: PreparedSplit, scores) -> EvalResult:
    n = len(prepared.examples)
    nll, hits, counts = [0.0] * n, [0.0] * n, [0.0] * n
    for seq, spans in zip(prepared.sequences, scores):
        for lp, h, k in spans:
            nll[seq.example] -= lp
            hits[seq.example] += h
            counts[seq.example] += k
    total = sum(counts)
    if total == 0:
        raise InputError(f"the {prepared.part} part of task {prepared.task} has no target tokens to score")
    value = sum(hits) / total
    low, high = ratio_interval(hits, counts)
    per_example = [h / c if c else 0.0 for h, c in zip(hits, counts)]
    extra = {
        "perplexity": math.exp(sum(nll) / total),
        "nll_per_token": sum(nll) / total,
        "tokens": int(total),
        "input_tokens": prepared.input_tokens,
    }
    soft = [-x / c if c else 0.0 for x, c in zip(nll, counts)]
    return EvalResult("token_accuracy", value, low, high, n, extra, per_example, counts, prepared.ids, soft)


# ---- generation -------------------------------------------------------------------------------------


def cut_at_stop(text: str, until: tuple[str, ...]) -> str:
    """The generation up to (not including) the first stop string."""
    cut = len(text)
    for stop in until:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


def normalise_answer(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@torch.inference_mode()
def generate_greedy(model, prompts: list[tuple[int, ...]], pad_id: int, eos_id: int | None, max_new: int, batch_size: int, show_progress: bool, stop=None) -> list[list[int]]:
    """Greedy continuations of each prompt, batched and left-padded, with a KV cache.

    A row stops at EOS or when `stop(tokens)` says so; the batch stops when every row has.
    """
    device = device_of(model)
    cache_arg = cache_argument(model)
    outputs: list[list[int]] = [[] for _ in prompts]
    batches = batches_by_length([len(p) for p in prompts], batch_size, 1 << 30)
    with progress.bar("generate", total=len(prompts)) if show_progress else null_bar() as bar:
        for batch in batches:
            ids, mask, positions = left_pad([prompts[i] for i in batch], pad_id, device)
            done = torch.zeros(len(batch), dtype=torch.bool, device=device)
            cache = None
            step_ids, step_pos = ids, positions
            for _ in range(max_new):
                out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True, logits_to_keep=1, **{cache_arg: cache})
                cache = returned_cache(out)
                nxt = out.logits[:, -1].argmax(-1)
                for r, i in enumerate(batch):
                    if not done[r]:
                        outputs[i].append(int(nxt[r]))
                        if (eos_id is not None and int(nxt[r]) == eos_id) or (stop and stop(outputs[i])):
                            done[r] = True
                if bool(done.all()):
                    break
                step_ids = nxt[:, None]
                step_pos = step_pos[:, -1:] + 1
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            bar.advance(len(batch))
    return outputs


def _evaluate_generation(model, prepared: PreparedSplit, batch_size: int, show_progress: bool) -> EvalResult:
    tok = prepared.tokenizer

    def stop(tokens: list[int]) -> bool:
        text = tok.decode(tokens[-16:], skip_special_tokens=True)
        return any(s in text for s in prepared.until)

    outputs = generate_greedy(model, prepared.prompts, prepared.pad_id, prepared.eos_id, prepared.max_gen_toks, batch_size, show_progress, stop)
    scores = []
    for e, tokens in zip(prepared.examples, outputs):
        answer = cut_at_stop(tok.decode(tokens, skip_special_tokens=True), prepared.until)
        scores.append(float(normalise_answer(answer) == normalise_answer(e.target)))
    n = len(scores)
    low, high = wilson_interval(sum(scores), n)
    extra = {"generated_tokens": sum(map(len, outputs)), "input_tokens": prepared.input_tokens}
    return EvalResult("exact_match", sum(scores) / n, low, high, n, extra, scores, [1.0] * n, prepared.ids)


# ---- stage eval ----------------------------------------------------------------------------------------


def run_label(options: EvalOptions) -> str:
    """Each (model, split, limit) gets its own folder under WS/eval, so dense and pruned results coexist."""
    if options.model is None:
        who = "dense"
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
        check_fits_positions(model, longest_input(prepared), "--max-length")
        start = time.perf_counter()
        result = evaluate(model, prepared, options.batch_size)
    seconds = time.perf_counter() - start
    report = {
        "run": label,
        "task": bound.name,
        "output_type": bound.output_type,
        "split": options.split,
        "model": "dense" if options.model is None else str(Path(options.model).expanduser().resolve()),
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
