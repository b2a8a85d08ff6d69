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
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
