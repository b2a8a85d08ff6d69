"""sieve: prune a causal language model down to what one task needs (LLM-Sieve).

The Python API: `LLMSieveConfig`, `TransformerPruner`, `diagnose_model` (the seed's names,
for in-memory models and your own metric), `load_pruned` (reload a pruned model folder),
`run_pipeline` (all stages on a workspace, like `sieve run`), and each stage's `run_*`.
"""

__version__ = "0.1.0"

from .api import LLMSieveConfig, TransformerPruner, diagnose_model  # noqa: E402
from .discover import DiscoverOptions, diagnose, run_discover  # noqa: E402
from .errors import SieveError  # noqa: E402
from .models import load_model  # noqa: E402
from .pipeline import RunOptions, run_pipeline  # noqa: E402
from .pruned import load_pruned  # noqa: E402
from .workspace import Workspace  # noqa: E402

__all__ = [
    "DiscoverOptions",
    "LLMSieveConfig",
    "RunOptions",
    "SieveError",
    "TransformerPruner",
    "Workspace",
    "diagnose",
    "diagnose_model",
    "load_model",
    "load_pruned",
    "run_discover",
    "run_pipeline",
]
