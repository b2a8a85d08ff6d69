"""What every command shares: option aliases, the console, and error handling."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Callable

import typer
from rich.console import Console

from .. import progress
from ..errors import SieveError

console = Console()
err_console = Console(stderr=True)


class State:
    debug = False
    quiet = False


state = State()

WorkspaceOpt = Annotated[Path, typer.Option("--workspace", "-w", help="Workspace folder (created if missing).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace outputs made from other inputs.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="Torch device, e.g. cpu, cuda, cuda:1.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Compute dtype: float32, bfloat16 or float16.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of tables.")]


def setup(debug: bool, quiet: bool) -> None:
    state.debug, state.quiet = debug, quiet
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    from rich.logging import RichHandler

    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=debug)], force=True)
    for noisy in ("transformers", "datasets", "urllib3", "httpx", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not debug else logging.INFO)
    progress.enable(not quiet and err_console.is_terminal)


def sieve_command(fn: Callable) -> Callable:
    """Map domain errors to one red line and exit code 1; a traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SieveError as exc:
            if state.debug:
                raise
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: rerun the same command to continue where it stopped")
            raise typer.Exit(130) from None

    return wrapper


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def human(n: float) -> str:
    """12_345_678 -> '12.3M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"
