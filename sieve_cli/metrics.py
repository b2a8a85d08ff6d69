"""The evaluator's metrics from per-sequence span scores: `EvalResult`, `result_of` (value always higher-is-better).

- multiple_choice: accuracy of the choice with the highest summed log-likelihood (lm-eval `acc`);
  `acc_norm` (log-likelihood per character of the choice), chance and majority levels in `extra`.
- text_modelling: next-token top-1 accuracy over the target's tokens (token-weighted);
  perplexity = exp(mean negative log-likelihood per target token) in `extra`.
Generation's exact match is in `generation.py`. Pure: no model, no I/O.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from .errors import InputError
from .intervals import ratio_interval, wilson_interval
from .prepared import PreparedSplit


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


def result_of(prepared: PreparedSplit, scores) -> EvalResult:
    """The metric of a scoring task from its per-sequence span scores (`score_sequences`' output,
    or the streaming evaluator's)."""
    if prepared.output_type == "multiple_choice":
        return multiple_choice_result(prepared, scores)
    return text_modelling_result(prepared, scores)


def multiple_choice_result(prepared: PreparedSplit, scores) -> EvalResult:
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


def text_modelling_result(prepared: PreparedSplit, scores) -> EvalResult:
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
