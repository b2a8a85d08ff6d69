"""The real SmolLM2 on a small slice of sst2: the evaluator must see that it beats chance."""

import pytest
import torch

from sieve_cli.evaluate import evaluate, prepare
from sieve_cli.models import load_model
from sieve_cli.tasks import bind_task
from sieve_cli.workspace import Workspace

from .test_tasks import EXAMPLES


@pytest.mark.slow
def test_smollm2_beats_chance_on_sst2(smollm2_gguf, data_root, tmp_path):
    torch.set_num_threads(2)
    model, tokenizer = load_model(smollm2_gguf)
    bound = bind_task(Workspace(tmp_path / "ws"), EXAMPLES / "sst2.yaml", data_root=data_root)
    prepared = prepare(bound, "test", tokenizer, limit=48)
    assert all(len(s.spans) == 2 for s in prepared.sequences)  # " negative"/" positive": one forward each
    result = evaluate(model, prepared, batch_size=16)
    assert result.n == 48 and result.extra["chance"] == 0.5
    assert result.value > 0.6, result  # README reference: 68% over 500 examples, 4-shot
    assert result.ci_low < result.value < result.ci_high
