"""What every command shares: the options derived from the stages' dataclasses, the console, errors.

A command is a plain function whose keyword-only parameters name options dataclasses
(`stage_command(options=Group(SearchOptions))`); the decorator replaces each by one Typer
option per dataclass field (flag, short flag, help and default all read from the field), and
builds the dataclass from what the user typed. So a default lives in one place, and the CLI,
the Python API and the manifests agree on it. The options shared by several commands
(workspace, task, data root, json, force) are declared once here.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console

from .. import progress
from ..errors import SieveError
from ..files import disk_full
from ..options import cli_fields, default_workspace
from ..units import count as human  # noqa: F401 - the commands print counts through it
from ..units import file_size  # noqa: F401 - and byte sizes

console = Console()
err_console = Console(stderr=True)


class State:
    debug = False
    quiet = False


state = State()

# ---- the options every command spells the same way ------------------------------------------------
WorkspaceOpt = Annotated[Optional[Path], typer.Option(
    "--workspace", "-w", help="Workspace folder (created if missing; default $SIEVE_WORKSPACE, else ./sieve-workspace).",
    show_default=False)]
TaskOpt = Annotated[Optional[Path], typer.Option(
    "--task", "-t", help="Task YAML to bind to the workspace (omit: the task already bound; with --force: rebind).")]
DataRootOpt = Annotated[Optional[Path], typer.Option(
    "--data-root", help="Folder that `{data_root}` in the task's data_files means (default: $SIEVE_DATA_ROOT, "
                        "else the nearest shared/data above the task file).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace outputs made from other inputs.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of tables.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Folder to write the pruned model to (outside the input "
                                                          "model's folder).")]


def setup(debug: bool, quiet: bool) -> None:
    state.debug, state.quiet = debug, quiet
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    from rich.logging import RichHandler

    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=debug)], force=True)
    for noisy in ("transformers", "datasets", "urllib3", "httpx", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not debug else logging.INFO)
    silence_known_noise(not debug)
    progress.enable(not quiet and err_console.is_terminal)
    if quiet:
        silence_third_party_bars()


# The libraries' own switches for their tqdm bars (transformers' "Loading weights", huggingface_hub's downloads,
# datasets' preparation): environment variables they read when imported, and a function for when they already are.
BAR_ENV = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")
BAR_SWITCHES = (("huggingface_hub.utils", "disable_progress_bars"), ("transformers.utils.logging", "disable_progress_bar"),
                ("datasets.utils", "disable_progress_bars"))


def silence_third_party_bars() -> None:
    """-q: every third-party bar off, importing none of those libraries (a stage imports what it needs, later,
    and then reads the variables; transformers follows huggingface_hub's). One already imported (the Python API,
    tests) is switched off directly."""
    for name in BAR_ENV:
        os.environ[name] = "1"
    for module, switch in BAR_SWITCHES:
        if module in sys.modules:
            getattr(sys.modules[module], switch)()


class KnownNoise(logging.Filter):
    """Drops a third-party logger's records that contain `text` (and `also`); every other record shows."""

    def __init__(self, text: str, also: str = "", only_if: Callable[[], bool] = lambda: True) -> None:
        super().__init__()
        self.text, self.also, self.only_if = text, also, only_if

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (self.text in message and self.also in message and self.only_if())


def _cpu_only_torch() -> bool:
    import torch  # loaded by then: only torchao, which needs torch, logs this

    return torch.version.cuda is None


# Third-party lines known to be harmless in sieve's runs, dropped at their logger by their text (--debug shows
# them). transformers imports torchao whenever it is installed (its quantizers module), even with nothing to
# quantise, so these appear on every run of an install with the `quantize` or `test` extra.
KNOWN_NOISE = (
    # torchao 0.18 registers two enums (KernelPreference, ScaleCalculationMode) the way torch 2.13 deprecates
    ("torch.utils._pytree", KnownNoise("is an Enum subclass and is now natively supported by torch.compile")),
    # on a CPU build of torch: its CUDA-only kernels (mxfp8, cutlass sm90a) cannot load, and there is no triton
    # for its GPU matmuls; sieve's int8 runs on neither
    ("torchao", KnownNoise("Failed to load ", also=".so", only_if=_cpu_only_torch)),
    ("torchao.kernel.intmm", KnownNoise("Detected no triton", only_if=_cpu_only_torch)),
)


def silence_known_noise(on: bool = True) -> None:
    for name, noise in KNOWN_NOISE:
        (logging.getLogger(name).addFilter if on else logging.getLogger(name).removeFilter)(noise)


def workspace_path(given: Path | None) -> Path:
    """The workspace a command uses, said on stderr so it is never a guess."""
    path = (given if given is not None else default_workspace()).expanduser().resolve()
    if not state.quiet:
        err_console.print(f"[dim]workspace: {path}[/]", highlight=False, soft_wrap=True)
    return path


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
        except Exception as exc:  # only a full disk is turned into one line here; anything else is a bug
            if state.debug or not disk_full(exc):
                raise
            err_console.print(f"[bold red]error:[/] the disk is full or a file passed a size limit ({exc}); free some "
                              f"space (or write where files may be that large) and rerun the same command: finished "
                              f"work is kept", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: rerun the same command to continue where it stopped")
            raise typer.Exit(130) from None

    return wrapper


# ---- options derived from the dataclasses ------------------------------------------------------------
@dataclass(frozen=True)
class Group:
    """An options dataclass as CLI options: all its declared fields, or `only` some, minus `exclude`."""

    cls: type
    only: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    defaults: dict = field(default_factory=dict)  # a command's own default for a field (e.g. the demo)

    def wanted(self, name: str) -> bool:
        return name not in self.exclude and (self.only is None or name in self.only)


def _plain_type(hint: Any) -> tuple[Any, bool]:
    """(type, optional) from `X | None` / Optional[X]."""
    args = typing.get_args(hint)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def _field_default(f: dataclasses.Field, group: Group) -> Any:
    if f.name in group.defaults:
        return group.defaults[f.name]
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def option_parameters(group: Group, prefix: str) -> list[tuple[inspect.Parameter, dataclasses.Field]]:
    """One keyword-only parameter per CLI field of `group.cls` (nested option dataclasses expanded)."""
    hints = typing.get_type_hints(group.cls)
    params = []
    for f in dataclasses.fields(group.cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint) and group.wanted(f.name):
            params += option_parameters(Group(hint), f"{prefix}__{f.name}")
            continue
        if "help" not in f.metadata or not group.wanted(f.name):
            continue
        meta = f.metadata
        default = _field_default(f, group)
        kind, optional = _plain_type(hint)
        if meta["parse"] is not None:  # lists and the like travel as text
            kind, default = str, (meta["show"](default) if meta["show"] else str(default))
        decls = [meta["flag"] or "--" + f.name.replace("_", "-")] + ([meta["short"]] if meta["short"] else [])
        annotation = Annotated[Optional[kind] if optional else kind, typer.Option(*decls, help=meta["help"])]
        params.append((inspect.Parameter(f"{prefix}__{f.name}", inspect.Parameter.KEYWORD_ONLY,
                                         default=default, annotation=annotation), f))
    return params


def build_options(cls: type, prefix: str, values: dict[str, Any], fixed: dict[str, Any] | None = None) -> Any:
    """The dataclass from the CLI values under `prefix` (parsed where the field says how)."""
    hints = typing.get_type_hints(cls)
    kwargs = dict(fixed or {})
    for f in dataclasses.fields(cls):
        key = f"{prefix}__{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            if any(k.startswith(key + "__") for k in values):
                kwargs[f.name] = build_options(hints[f.name], key, values)
        elif key in values:
            value, parse = values[key], f.metadata.get("parse")
            kwargs[f.name] = parse(value) if parse is not None and isinstance(value, str) else value
    return cls(**kwargs)


def stage_command(**groups: Group) -> Callable[[Callable], Callable]:
    """A command whose keyword arguments named in `groups` are built from the derived options.

    The command's own parameters (workspace, json, force, arguments) stay as written; each
    group adds its fields. Building the dataclass happens inside the error mapping, so a bad
    value gives the dataclass's one-line message.
    """

    def decorate(fn: Callable) -> Callable:
        own = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)
        params = [p.replace(annotation=hints.get(p.name, p.annotation))
                  for p in own.parameters.values() if p.name not in groups]
        derived = {name: option_parameters(group, name) for name, group in groups.items()}
        params += [p for items in derived.values() for p, _ in items]

        @sieve_command
        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            built = {}
            for name, group in groups.items():
                keys = [p.name for p, _ in derived[name]]
                values = {k: kwargs.pop(k) for k in keys}
                # a required field (the model of discover, apply's OUT) is the command's argument of that name
                taken = {f.name: kwargs[f.name] for f in _required(group.cls) if f.name in kwargs}
                built[name] = build_options(group.cls, name, values, fixed=_fixed(group) | taken)
            return fn(**kwargs, **built)

        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


def _required(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def _fixed(group: Group) -> dict:
    """A command's defaults for fields it does not expose as options (the demo's fixed settings)."""
    exposed = {f.name for f in cli_fields(group.cls) if group.wanted(f.name)}
    return {k: v for k, v in group.defaults.items() if k not in exposed}


def bind_given_task(ws, task: Path | None, split, data_root: Path | None, force: bool) -> None:
    """Bind --task to the workspace when given (every command that takes --task does it this way)."""
    if task is not None:
        from ..tasks import bind_task

        bind_task(ws, task, force=force, split=split, data_root=data_root)


# ---- output ----------------------------------------------------------------------------------------
def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
