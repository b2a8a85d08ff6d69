"""The LM head restricted to a task's vocabulary (`--vocab task`): `TaskHead` and putting it in place.

The head scores only the kept ids (K of the V vocabulary rows) and returns full-vocabulary logits
with the dtype's most negative finite value at every other id, so generate(), multiple-choice and
text scoring run unchanged: a softmax over those logits is the softmax over the kept ids (the other
terms underflow to exactly 0), argmax and sampling never pick an outside id, and no -inf reaches a
sum or a difference (an outside target's log-probability stays finite). An untied head keeps only
its K rows (K x hidden, and K bias values where it has a bias); a tied head keeps the shared
embedding whole and tied and gathers its K rows at each call (compute saved, no parameters). The
token embedding is never touched: an input id outside the kept set still has its row.

`TaskHead`'s source is copied into a pruned folder's modeling_sieve.py (`modeling.py`), so it imports
only torch.
"""

from __future__ import annotations

import torch
from torch import nn


class TaskHead(nn.Module):
    """Logits of the kept vocabulary ids (`index`, int64, ascending), the dtype's minimum elsewhere.

    `weight` is K x hidden (an untied head's kept rows) or, when `tied`, the V x hidden table shared
    with the token embedding (tied by the loader under the same name as the head it replaces).
    """

    def __init__(self, vocab_size: int, hidden_size: int, kept: int, tied: bool = False, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.vocab_size, self.hidden_size, self.kept, self.tied = vocab_size, hidden_size, kept, tied
        rows = vocab_size if tied else kept
        self.weight = nn.Parameter(torch.empty(rows, hidden_size, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(kept, dtype=dtype, device=device)) if bias else None
        self.register_buffer("index", torch.zeros(kept, dtype=torch.long, device=device))

    @property
    def in_features(self) -> int:  # what nn.Linear callers read
        return self.hidden_size

    @property
    def out_features(self) -> int:
        return self.vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.weight.index_select(0, self.index) if self.tied else self.weight
        scores = nn.functional.linear(hidden, weight, self.bias)
        logits = scores.new_full((*scores.shape[:-1], self.vocab_size), torch.finfo(scores.dtype).min)
        return logits.index_copy_(logits.dim() - 1, self.index, scores)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, vocab_size={self.vocab_size}, kept={self.kept}, tied={self.tied}"


def head_name(model: nn.Module) -> str:
    """The module name of the model's LM head (lm_head, embed_out, ...)."""
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is head and name:
            return name
    raise ValueError(f"{type(model).__name__} has no output head that sieve can restrict to a task vocabulary")


def is_tied(model: nn.Module, head: nn.Module) -> bool:
    embedding = model.get_input_embeddings()
    return embedding is not None and getattr(head, "weight", None) is getattr(embedding, "weight", None)


def task_head_of(model: nn.Module, kept_ids) -> TaskHead:
    """A TaskHead holding the model's head rows at `kept_ids` (sorted, unique, below the head's rows).

    A tied head's TaskHead holds the embedding's very Parameter; an untied one copies its K rows.
    """
    head = model.get_output_embeddings()
    weight = head.weight
    index = torch.as_tensor(sorted(set(int(i) for i in kept_ids)), dtype=torch.long)
    vocab, hidden = weight.shape
    if index.numel() == 0 or int(index[0]) < 0 or int(index[-1]) >= vocab:
        raise ValueError(f"kept ids must lie in [0, {vocab}) and be at least one")
    bias = getattr(head, "bias", None)
    tied = is_tied(model, head)
    new = TaskHead(vocab, hidden, index.numel(), tied=tied, bias=bias is not None, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        new.index = index.to(weight.device)
        new.weight = weight if tied else nn.Parameter(weight.detach().index_select(0, new.index).clone())
        if bias is not None:
            new.bias = nn.Parameter(bias.detach().index_select(0, new.index).clone())
    return new


def task_head_spec(module: TaskHead) -> dict:
    """The module table's entry of a TaskHead (sieve.json `factored`, config.json `sieve_factored`)."""
    return {"type": "task_head", "vocab_size": module.vocab_size, "in_features": module.hidden_size,
            "kept": module.kept, "tied": module.tied, "bias": module.bias is not None}


__all__ = ["TaskHead", "head_name", "is_tied", "task_head_of", "task_head_spec"]
