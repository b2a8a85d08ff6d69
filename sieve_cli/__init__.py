"""sieve: prune a causal language model down to what one task needs (LLM-Sieve)."""

__version__ = "0.1.0"

from .discover import DiscoverOptions, diagnose, run_discover  # noqa: E402
from .errors import SieveError  # noqa: E402
from .models import load_model  # noqa: E402
from .workspace import Workspace  # noqa: E402

__all__ = ["DiscoverOptions", "SieveError", "Workspace", "diagnose", "load_model", "run_discover"]
