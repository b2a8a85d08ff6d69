"""Log-likelihood scoring of prepared sequences: the forward passes behind `evaluate`.

Every sequence is scored exactly as it would be alone: (sum log p(targets), top-1 hits, targets).
Only the positions that predict a target are projected to the vocabulary (`logits_to_keep`),
and sequences are batched by length, longest first.

Two paths give the same numbers (within float rounding):
- padded: each batch left-padded, with position ids that restart at 0 on each row's first token.
- shared prefix: when every sequence starts with the same tokens (a few-shot prompt), the prefix
  runs once and its keys and values (a transformers `Cache`) are reused by every batch, which then
  runs only the suffixes, right-padded after the prefix. Right padding keeps every real token at
  the key index equal to its position, which is what sliding-window layers (Gemma 2/3) count in.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch

from . import progress
from .accumulate import pad_batch

# Below this many shared tokens (a BOS, a common first word) the prefix pass and the per-batch
# cache copies are not worth a second code path; a few-shot prompt shares tens to hundreds.
MIN_SHARED_PREFIX = 16

SpanScore = tuple[float, int, int]  # (sum log p(targets), targets predicted top-1, number of targets)


@dataclass(frozen=True)
class Span:
    """Target tokens predicted by the last len(targets) input positions of a sequence."""

    choice: int  # index of the choice it scores (0 for text modelling)
    targets: tuple[int, ...]


@dataclass(frozen=True)
class Sequence:
    example: int  # index into PreparedSplit.examples
    tokens: tuple[int, ...]  # model input (the full text minus its last token)
    spans: tuple[Span, ...]


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def cache_argument(model) -> str:
    """The forward keyword of the KV cache: transformers renamed `past_key_values` to `cache` during 5.x."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(output):
    return output["cache"] if "cache" in output else output["past_key_values"]


def batches_by_length(lengths: list[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest first, each batch within `batch_size` rows and `max_batch_tokens` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current = [], []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and (len(current) >= batch_size or width * (len(current) + 1) > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def left_pad(rows: list[tuple[int, ...]], pad_id: int, device: torch.device):
    """Left-padded ids, attention mask and position ids that restart at 0 on each row's first real token."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def longest_span(seq: Sequence) -> int:
    return max(len(span.targets) for span in seq.spans)


def shared_prefix_length(sequences: list[Sequence]) -> int:
    """Tokens every sequence starts with, capped so that every scored position comes after them.

    The sequences are already token ids, so the cached prefix is exactly the tokens each sequence
    would have fed the model: no question of where a text prefix would tokenise differently.
    """
    if len(sequences) < 2:
        return 0
    first = sequences[0].tokens
    # position len(tokens) - k predicts the first of k targets: it must be a suffix position
    n = max(0, min(len(s.tokens) - longest_span(s) for s in sequences))
    for seq in sequences[1:]:
        tokens = seq.tokens
        i = 0
        while i < n and tokens[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return n


def span_scores(logits: torch.Tensor, seq: Sequence, keep: int) -> list[SpanScore]:
    """Scores of each span of `seq` from its `keep` rows of logits (row keep-1 predicts the last target).

    Called one sequence at a time, so the float32 log-softmax temporaries stay one row of logits in size.
    """
    row = logits.float()
    norm = torch.logsumexp(row, dim=-1)
    top = row.argmax(dim=-1)
    out = []
    for span in seq.spans:
        k = len(span.targets)
        target = torch.tensor(span.targets, device=row.device)
        lp = row[keep - k :].gather(-1, target[:, None])[:, 0] - norm[keep - k :]
        hits = int((top[keep - k :] == target).sum())
        out.append((float(lp.double().sum()), hits, k))
    return out


@torch.inference_mode()
def score_sequences(
    model, sequences: list[Sequence], pad_id: int, batch_size: int = 16, max_batch_tokens: int = 8192,
    show_progress: bool = True, reuse_prefix: bool = True,
) -> list[list[SpanScore]]:
    """Per sequence, per span: (sum log p(targets), targets predicted top-1, number of targets).

    With `reuse_prefix` (the default) a prefix shared by all sequences (at least MIN_SHARED_PREFIX
    tokens) runs once and is reused from the KV cache; otherwise, or when there is none, every
    batch runs whole sequences, left-padded.
    """
    out: list[list[SpanScore]] = [[] for _ in sequences]
    prefix = shared_prefix_length(sequences) if reuse_prefix else 0
    # batches by full length = batches by suffix length, as the prefix is common
    batches = batches_by_length([len(s.tokens) for s in sequences], batch_size, max_batch_tokens)
    with progress.bar("eval", total=len(sequences)) if show_progress else null_bar() as bar:
        if prefix >= MIN_SHARED_PREFIX:
            run = _prefix_runner(model, sequences[0].tokens[:prefix], pad_id)
        else:
            run = _padded_runner(model, pad_id)
        for batch in batches:
            rows = [sequences[i] for i in batch]
            keep = max(longest_span(s) for s in rows)
            logits = run(rows, keep)
            for r, seq in enumerate(rows):
                out[batch[r]] = span_scores(logits[r], seq, keep)
            bar.advance(len(batch))
    return out


def _padded_runner(model, pad_id: int):
    """Whole sequences, left-padded: the last `keep` positions of every row are its scored ones."""
    device = device_of(model)

    def run(rows: list[Sequence], keep: int) -> torch.Tensor:
        ids, mask, positions = left_pad([s.tokens for s in rows], pad_id, device)
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep, use_cache=False).logits

    return run


def run_prefix(model, prefix, **extra):
    """Run `prefix` (token ids) alone at positions 0.. and return its keys/values (a transformers `Cache`).

    The model builds the cache its config asks for (sliding-window layers keep only their window).
    Capture runs the backbone with hooks here; scoring the causal LM (`extra`: logits_to_keep=1).
    """
    return returned_cache(model(**prefix_inputs(prefix, device_of(model)), **extra, **{cache_argument(model): None}))


def prefix_inputs(prefix, device: torch.device) -> dict:
    """Forward keywords that run `prefix` alone, from an empty cache the model creates."""
    ids = torch.tensor([list(prefix)], dtype=torch.long, device=device)
    return {"input_ids": ids, "position_ids": torch.arange(len(prefix), device=device)[None], "use_cache": True}


def suffix_inputs(prefix_cache, prefix_length: int, suffixes, pad_id: int, device: torch.device) -> dict:
    """Forward keywords that run `suffixes` after a cached prefix of `prefix_length` tokens.

    Suffixes are right-padded after the prefix, at positions prefix_length.. as in the full
    sequences; the forward appends the suffix keys to the cache it is given, so each batch gets
    its own copy of the prefix's. The suffix part of the mask is `suffix_mask(inputs)`.
    """
    ids, mask = pad_batch(suffixes, pad_id, device)
    rows, width = ids.shape
    full_mask = torch.cat([torch.ones((rows, prefix_length), dtype=torch.long, device=device), mask], dim=1)
    positions = torch.arange(prefix_length, prefix_length + width, device=device)[None].expand(rows, width)
    cache = copy.deepcopy(prefix_cache)
    cache.batch_repeat_interleave(rows)
    return {"input_ids": ids, "attention_mask": full_mask, "position_ids": positions, "use_cache": True, "cache": cache}


def suffix_mask(inputs: dict) -> torch.Tensor:
    """The mask of the suffix tokens alone (1 on real tokens) of `suffix_inputs`."""
    return inputs["attention_mask"][:, -inputs["input_ids"].shape[1] :]


def cache_keywords(model, inputs: dict) -> dict:
    """`inputs` with the cache under the keyword this transformers version names it."""
    rest = {k: v for k, v in inputs.items() if k != "cache"}
    return {**rest, cache_argument(model): inputs["cache"]} if "cache" in inputs else rest


def call_with_cache(model, inputs: dict, **extra):
    return model(**cache_keywords(model, inputs), **extra)


def _prefix_runner(model, prefix: tuple[int, ...], pad_id: int):
    """Run `prefix` once; then each batch runs only its suffixes, attending to the prefix's cached keys/values.

    Returns run(rows, keep) -> logits (rows, keep, vocab) at each row's last `keep` input positions.
    """
    device = device_of(model)
    n = len(prefix)
    prefix_cache = run_prefix(model, prefix, logits_to_keep=1)

    def run(rows: list[Sequence], keep: int) -> torch.Tensor:
        suffixes = [s.tokens[n:] for s in rows]
        inputs = suffix_inputs(prefix_cache, n, suffixes, pad_id, device)
        # each row's last `keep` suffix positions (rows shorter than `keep` clamp at 0: those rows never read them)
        lengths = torch.tensor([len(s) for s in suffixes], device=device)
        scored = (lengths[:, None] - keep + torch.arange(keep, device=device)[None]).clamp(min=0)
        return call_with_cache(model, inputs, logits_to_keep=scored).logits

    return run


class null_bar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def advance(self, n: float = 1) -> None:
        pass
