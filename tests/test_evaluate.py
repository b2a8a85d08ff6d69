"""The evaluator against references recomputed one sequence at a time, without batching or padding."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sieve_cli.evaluate import (
    MIN_SHARED_PREFIX,
    Sequence,
    Span,
    cut_at_stop,
    evaluate,
    generate_greedy,
    prepare,
    ratio_interval,
    score_sequences,
    shared_prefix_length,
    wilson_interval,
)
from sieve_cli.tasks import SplitOptions

from .test_tasks import bind
from .tiny import tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def reference_loglik(model, context: str, continuation: str) -> tuple[float, int, int]:
    """(sum log p, top-1 hits, tokens) of the continuation, one unpadded forward of the full text."""
    ctx, full = TOK.encode(context), TOK.encode(context + continuation)
    with torch.no_grad():
        logp = model(torch.tensor([full])).logits[0].double().log_softmax(-1)
    start = max(len(ctx), 1)
    lp = sum(logp[t - 1, full[t]].item() for t in range(start, len(full)))
    hits = sum(int(logp[t - 1].argmax().item() == full[t]) for t in range(start, len(full)))
    return lp, hits, len(full) - start


def test_multiple_choice_matches_unbatched_reference(model, tmp_path):
    bound, _ = bind(tmp_path, "multiple_choice", num_fewshot=1)
    prepared = prepare(bound, "test", TOK)
    result = evaluate(model, prepared, batch_size=3)
    acc, acc_norm = [], []
    for e in bound.examples("test"):
        ll = [reference_loglik(model, e.context, " " + c)[0] for c in e.choices]
        acc.append(float(max(range(2), key=lambda i: ll[i]) == e.gold))
        norm = [l / len(" " + c) for l, c in zip(ll, e.choices)]
        acc_norm.append(float(max(range(2), key=lambda i: norm[i]) == e.gold))
    assert result.metric == "accuracy" and result.n == 8
    assert result.per_example == acc and result.value == pytest.approx(sum(acc) / 8)
    assert result.extra["acc_norm"] == pytest.approx(sum(acc_norm) / 8)
    assert (result.ci_low, result.ci_high) == pytest.approx(wilson_interval(sum(acc), 8))
    golds = [e.gold for e in bound.examples("test")]  # the constant-answer baseline the chance guard uses
    assert result.extra["majority"] == max(golds.count(g) for g in set(golds)) / 8
    # the per-choice log-likelihoods themselves, not only their argmax
    scores = score_sequences(model, prepared.sequences, prepared.pad_id, batch_size=5)
    for seq, spans in zip(prepared.sequences, scores):
        e = prepared.examples[seq.example]
        for span, (lp, hits, k) in zip(seq.spans, spans):
            ref = reference_loglik(model, e.context, " " + e.choices[span.choice])
            assert lp == pytest.approx(ref[0], abs=1e-4) and (hits, k) == ref[1:]


def test_single_token_choices_share_one_sequence(tmp_path):
    bound, _ = bind(tmp_path, "multiple_choice", doc_to_choice=["n", "y"])
    prepared = prepare(bound, "test", TOK)
    assert len(prepared.sequences) == 8 and all(len(s.spans) == 2 for s in prepared.sequences)
    (tmp_path / "b").mkdir()
    two, _ = bind(tmp_path / "b", "multiple_choice")  # "no" / "yes way": one sequence per choice
    assert len(prepare(two, "test", TOK).sequences) == 16


def test_text_modelling_matches_unbatched_reference(model, tmp_path):
    bound, _ = bind(tmp_path, "text_modelling")
    prepared = prepare(bound, "test", TOK)
    result = evaluate(model, prepared, batch_size=3)
    refs = [reference_loglik(model, e.context, " " + e.target) for e in bound.examples("test")]
    hits, tokens, nll = sum(r[1] for r in refs), sum(r[2] for r in refs), -sum(r[0] for r in refs)
    assert result.metric == "token_accuracy" and result.extra["tokens"] == tokens
    assert result.value == pytest.approx(hits / tokens)
    assert result.extra["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert result.weights == [r[2] for r in refs]
    assert result.per_example == pytest.approx([r[1] / r[2] for r in refs])
    assert sum(w * s for w, s in zip(result.weights, result.per_example)) / sum(result.weights) == pytest.approx(result.value)


def test_truncation_keeps_the_target_and_the_limit(model, tmp_path):
    bound, _ = bind(tmp_path, "text_modelling")
    prepared = prepare(bound, "test", TOK, max_length=12)
    assert all(len(s.tokens) <= 12 for s in prepared.sequences)
    for seq in prepared.sequences:  # the context loses its beginning before the target loses anything
        target = TOK.encode(" " + prepared.examples[seq.example].target)
        assert list(seq.spans[0].targets) == target[: len(seq.spans[0].targets)]
    assert evaluate(model, prepared).n == 8


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt", "gpt_neox", "qwen3", "gemma2", "phi3"])
def test_left_padding_scores_like_no_padding(model_type):
    """Batched, left-padded scoring equals one sequence at a time on every family."""
    model = tiny_model(model_type)
    g = torch.Generator().manual_seed(0)
    sequences = []
    for i, length in enumerate([5, 17, 9, 30, 2]):
        tokens = torch.randint(3, 100, (length + 3,), generator=g).tolist()
        sequences.append(Sequence(i, tuple(tokens[:-1]), (Span(0, tuple(tokens[-3:])),)))
    batched = score_sequences(model, sequences, pad_id=0, batch_size=5)
    for seq, got in zip(sequences, batched):
        alone = score_sequences(model, [seq], pad_id=0, batch_size=1)
        assert got[0][0] == pytest.approx(alone[0][0][0], abs=1e-4) and got[0][1:] == alone[0][0][1:]
    with torch.no_grad():  # and the one-at-a-time path equals a plain forward
        seq = sequences[3]
        full = list(seq.tokens) + [seq.spans[0].targets[-1]]
        logp = model(torch.tensor([full])).logits[0].double().log_softmax(-1)
        ref = sum(logp[t - 1, full[t]].item() for t in range(len(full) - 3, len(full)))
    assert batched[3][0][0] == pytest.approx(ref, abs=1e-4)


def reference_generation(model, context: str, until, max_new: int) -> str:
    ids = TOK.encode(context)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == TOK.eos_token_id or any(s in TOK.decode(out) for s in until):
                break
    return cut_at_stop(TOK.decode(out, skip_special_tokens=True), until)


def test_generate_until_matches_unbatched_greedy(model, tmp_path):
    bound, _ = bind(tmp_path, "generate_until")
    prepared = prepare(bound, "test", TOK)
    outputs = generate_greedy(model, prepared.prompts, prepared.pad_id, prepared.eos_id, 6, batch_size=3, show_progress=False)
    refs = [reference_generation(model, e.context, ("\n", "."), 6) for e in prepared.examples]
    got = [cut_at_stop(TOK.decode(o, skip_special_tokens=True), ("\n", ".")) for o in outputs]
    assert got == refs
    assert evaluate(model, prepared, batch_size=3).value == 0.0  # a random model never says "cat!"
    # with the gold answers set to what the model says (spacing aside), every example is an exact match
    rigged = dataclasses.replace(prepared, examples=[dataclasses.replace(e, target=f"  {r} ") for e, r in zip(prepared.examples, refs)])
    result = evaluate(model, rigged, batch_size=2)
    assert result.metric == "exact_match" and result.value == 1.0 and result.n == 8


def test_same_inputs_give_identical_numbers(model, tmp_path):
    bound, _ = bind(tmp_path, "text_modelling")
    prepared = prepare(bound, "search", TOK, limit=3)
    assert prepared.ids == bound.ids("search")[:3]
    a, b = evaluate(model, prepared, batch_size=2), evaluate(model, prepared, batch_size=2)
    assert a == b


def test_intervals():
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    # equal-size clusters: the ratio interval is the normal interval over per-example accuracies
    per = [0.2, 0.5, 0.9, 0.4]
    low, high = ratio_interval([p * 10 for p in per], [10] * 4)
    mean = sum(per) / 4
    sd = math.sqrt(sum((p - mean) ** 2 for p in per) / 3 / 4)
    assert (low, high) == pytest.approx((mean - 1.96 * sd, mean + 1.96 * sd), abs=1e-3)


def test_empty_or_bad_options(tmp_path):
    from sieve_cli.errors import InputError

    bound, _ = bind(tmp_path, "text_modelling", split=SplitOptions(search=4, test=8))
    with pytest.raises(InputError, match="--limit"):
        prepare(bound, "test", TOK, limit=0)
    with pytest.raises(InputError, match="split part"):
        prepare(bound, "validation", TOK)


@pytest.mark.slow
def test_smollm2_beats_chance_on_sst2(smollm2_gguf, data_root, tmp_path):
    """The real SmolLM2 on a small slice of sst2: the evaluator must see that it beats chance, with the prefix cached."""
    from sieve_cli.models import load_model
    from sieve_cli.tasks import bind_task
    from sieve_cli.workspace import Workspace

    from .test_tasks import EXAMPLES

    model, tokenizer = load_model(smollm2_gguf)
    bound = bind_task(Workspace(tmp_path / "ws"), EXAMPLES / "sst2.yaml", data_root=data_root)
    prepared = prepare(bound, "test", tokenizer, limit=48)
    assert all(len(s.spans) == 2 for s in prepared.sequences)  # " negative"/" positive": one forward each
    result = evaluate(model, prepared, batch_size=16)
    assert result.n == 48 and result.extra["chance"] == 0.5
    assert result.value > 0.6, result  # README reference: 68% over 500 examples, 4-shot
    assert result.ci_low < result.value < result.ci_high
    # the 4-shot prefix is shared and cached; the log-likelihoods equal whole, left-padded sequences
    assert shared_prefix_length(prepared.sequences) >= MIN_SHARED_PREFIX
    some = prepared.sequences[:12]
    cached = score_sequences(model, some, prepared.pad_id, batch_size=8, show_progress=False)
    whole = score_sequences(model, some, prepared.pad_id, batch_size=8, show_progress=False, reuse_prefix=False)
    for a, b in zip(cached, whole, strict=True):
        assert [s[0] for s in a] == pytest.approx([s[0] for s in b], abs=1e-4) and [s[1:] for s in a] == [s[1:] for s in b]
