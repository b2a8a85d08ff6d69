"""The shared-prefix path of the scorer against whole, unpadded sequences run one at a time."""

from __future__ import annotations

import pytest
import torch

from sieve_cli.evaluate import (
    MIN_SHARED_PREFIX,
    Sequence,
    Span,
    evaluate,
    prepare,
    score_sequences,
    shared_prefix_length,
)

from .test_tasks import bind
from .tiny import tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()
# gemma3_text: its tiny config has a 16-token sliding window, shorter than the 24-token prefix below
FAMILIES = ["llama", "gpt2", "gemma3_text", "qwen2"]


def random_sequences(prefix_len: int = 24, seed: int = 1) -> list[Sequence]:
    """One shared prefix, suffixes of different lengths, spans of 1-3 targets, some with two spans."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, 100, (prefix_len,), generator=g).tolist()
    out = []
    for i, length in enumerate([3, 9, 1, 17, 5, 2, 12, 30]):
        text = prefix + torch.randint(3, 100, (length + 1,), generator=g).tolist()
        k = min(1 + i % 3, length)  # the targets start after the prefix
        spans = [Span(0, tuple(text[-k:]))]
        if i % 2:  # a second choice of one token, sharing the input (as yes/no answers do)
            spans.append(Span(1, (int(text[-1] + 1) % 100,)))
        out.append(Sequence(i, tuple(text[:-1]), tuple(spans)))
    return out


def reference(model, seq: Sequence) -> list[tuple[float, int, int]]:
    """Each span scored from one plain forward of the sequence alone, no padding, no cache, float64 softmax."""
    with torch.no_grad():
        logp = model(torch.tensor([seq.tokens])).logits[0].double().log_softmax(-1)
    out = []
    for span in seq.spans:
        k = len(span.targets)
        rows = logp[len(seq.tokens) - k :]
        target = torch.tensor(span.targets)
        lp = rows.gather(-1, target[:, None]).sum().item()
        out.append((lp, int((rows.argmax(-1) == target).sum()), k))
    return out


class InputWidths:
    """Records (rows, width) of every forward, seen at the input embedding: what the model actually ran."""

    def __init__(self, model) -> None:
        self.shapes: list[tuple[int, int]] = []
        self.handle = model.get_input_embeddings().register_forward_hook(lambda m, args, out: self.shapes.append(tuple(args[0].shape)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_cached_prefix_scores_equal_whole_sequences(model_type, batch_size):
    model = tiny_model(model_type)
    sequences = random_sequences()
    assert shared_prefix_length(sequences) == 24
    with InputWidths(model) as seen:
        got = score_sequences(model, sequences, pad_id=0, batch_size=batch_size, show_progress=False)
    # the prefix ran once, alone; every batch after it ran only suffixes
    assert seen.shapes[0] == (1, 24)
    assert sum(rows for rows, _ in seen.shapes[1:]) == len(sequences)
    assert max(width for _, width in seen.shapes[1:]) == max(len(s.tokens) for s in sequences) - 24
    for seq, spans in zip(sequences, got, strict=True):
        for (lp, hits, k), (ref_lp, ref_hits, ref_k) in zip(spans, reference(model, seq), strict=True):
            assert lp == pytest.approx(ref_lp, abs=1e-4) and (hits, k) == (ref_hits, ref_k)


def test_prefix_stops_before_the_first_scored_position():
    """A sequence whose targets start inside the common tokens caps the prefix; none left means no cache."""
    prefix = tuple(range(3, 40))
    a = Sequence(0, prefix + (50, 51), (Span(0, (52,)),))
    b = Sequence(1, prefix + (60,), (Span(0, (61, 62)),))  # predicts 61 from the last prefix token
    assert shared_prefix_length([a, b]) == len(prefix) - 1
    assert shared_prefix_length([a]) == 0  # one sequence: nothing to share
    c = Sequence(2, (99,) + prefix, (Span(0, (1,)),))
    assert shared_prefix_length([a, b, c]) == 0


def test_without_a_shared_prefix_every_sequence_runs_whole():
    model = tiny_model("llama")
    sequences = [Sequence(i, (3 + i,) + s.tokens, s.spans) for i, s in enumerate(random_sequences())]
    assert shared_prefix_length(sequences) < MIN_SHARED_PREFIX
    with InputWidths(model) as seen:
        got = score_sequences(model, sequences, pad_id=0, batch_size=16, show_progress=False)
    assert seen.shapes == [(len(sequences), max(len(s.tokens) for s in sequences))]
    for seq, spans in zip(sequences, got, strict=True):
        assert [s[0] for s in spans] == pytest.approx([r[0] for r in reference(model, seq)], abs=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text"])
@pytest.mark.parametrize("output_type", ["multiple_choice", "text_modelling"])
def test_evaluate_results_unchanged_by_the_cache(model_type, output_type, tmp_path):
    """A few-shot task: metric, per-example scores and intervals as without the cache; log-likelihoods within 1e-4."""
    model = tiny_model(model_type)
    bound, _ = bind(tmp_path, output_type, num_fewshot=2)
    prepared = prepare(bound, "test", TOK)
    prefix = shared_prefix_length(prepared.sequences)
    assert prefix >= MIN_SHARED_PREFIX
    lengths = {len(s.tokens) - prefix for s in prepared.sequences}
    assert len(lengths) > 3  # suffixes of many lengths, so batches mix them
    with InputWidths(model) as seen:
        cached = evaluate(model, prepared, batch_size=3, show_progress=False)
    assert seen.shapes[0] == (1, prefix) and all(width < prefix for _, width in seen.shapes[1:])
    whole = evaluate(model, prepared, batch_size=3, show_progress=False, reuse_prefix=False)
    assert (cached.metric, cached.n, cached.ids, cached.weights) == (whole.metric, whole.n, whole.ids, whole.weights)
    assert cached.per_example == whole.per_example and cached.value == whole.value
    assert (cached.ci_low, cached.ci_high) == (whole.ci_low, whole.ci_high)
    assert cached.extra == pytest.approx(whole.extra, rel=1e-5)
    a = score_sequences(model, prepared.sequences, prepared.pad_id, batch_size=5, show_progress=False)
    for seq, spans in zip(prepared.sequences, a, strict=True):
        for (lp, hits, k), ref in zip(spans, reference(model, seq), strict=True):
            assert lp == pytest.approx(ref[0], abs=1e-4) and (hits, k) == ref[1:]
