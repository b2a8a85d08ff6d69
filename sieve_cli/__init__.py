"""sieve: prune a causal language model down to what one task needs (LLM-Sieve).

The Python API: `LLMSieveConfig`, `TransformerPruner`, `diagnose_model` (the seed's names,
for in-memory models and your own metric), `load_pruned` (reload a pruned model folder),
`run_pipeline` (all stages on a workspace, like `sieve run`), and each stage's `run_*`.
Names are imported on first use, so `import sieve_cli` (and `sieve --help`) loads no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .version import __version__
from .workspace import _HELD_LOCKS, Workspace  # no torch: `import sieve_cli` stays light

# public name -> the module that defines it
_EXPORTS = {
    "LLMSieveConfig": "api",
    "TransformerPruner": "api",
    "diagnose_model": "api",
    "DiscoverOptions": "options",
    "RunOptions": "options",
    "diagnose": "discover",
    "run_discover": "discover",
    "SieveError": "errors",
    "load_model": "models",
    "run_pipeline": "pipeline",
    "load_pruned": "pruned",
    "Plan": "plan",
    "Workspace": "workspace",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        if name.startswith("run_"):
            value = _releasing(value)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _releasing(function):
    """A stage function that releases the workspace locks it took when it returns (or fails), as
    TransformerPruner does: from Python, a finished call must not keep others out of the workspace."""
    import functools

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        held = set(_HELD_LOCKS)
        try:
            return function(*args, **kwargs)
        finally:
            for root in set(_HELD_LOCKS) - held:
                Workspace(root).unlock()

    return call


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
