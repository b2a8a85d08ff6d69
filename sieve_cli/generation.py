"""`generate_until` tasks: greedy generation, batched and left-padded with a KV cache, scored by exact match."""

from __future__ import annotations

import re

import torch

from . import progress
from .intervals import wilson_interval
from .metrics import EvalResult
from .prepared import PreparedSplit
from .scoring import batches_by_length, cache_argument, device_of, left_pad, null_bar, returned_cache


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


def evaluate_generation(model, prepared: PreparedSplit, batch_size: int, show_progress: bool) -> EvalResult:
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
