"""Numbers that prose states about a default equal the default: help texts, docstrings, the README.

Prose restating a default drifts when the default moves (`sieve eval --help` once stated split sizes
two defaults old). The checks read the patterns such prose uses ("--local-budget (16)", "--confidence,
default 0.9", "(--grid-step 0.01)", "test (25%, at most 300)", "default 1" in a field's own help) and
compare each number with the default of the option it names: in a command's help, that command's own
default; elsewhere the options dataclasses' default (any of them, for a flag several commands share).
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from pathlib import Path

import click
import pytest
import typer.main

from sieve_cli import options
from sieve_cli.cli import app
from sieve_cli.commands.run import DEMO_TASKS
from sieve_cli.options import SplitOptions, cli_fields
from sieve_cli.uniform import uniform_grid

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = typer.main.get_command(app).commands
NUMBER = r"([0-9][0-9_,]*(?:\.[0-9]+)?(?:e-?[0-9]+)?)"
FLAG = r"`?(--[a-z][a-z0-9-]*)`?"
FLAG_PATTERNS = (
    re.compile(FLAG + r"\s*\((?:default:?\s*)?" + NUMBER + r"\)"),  # --local-budget (16)
    re.compile(FLAG + r",?\s+default:?\s+" + NUMBER),  # `--confidence`, default 0.9
    re.compile(r"\(" + FLAG + r"\s+" + NUMBER + r"\)"),  # (--grid-step 0.01)
)
OWN_DEFAULT = re.compile(r"\bdefault:?\s+" + NUMBER + r"(?![0-9])", re.IGNORECASE)  # in a field's own help
SPLIT_PART = re.compile(r"\b(test|confirm|search) \(" + NUMBER + r"%, at most " + NUMBER + r"\)")
GRID_COST = re.compile(NUMBER + r" costs " + NUMBER + r" evaluations|" + NUMBER + r" costs " + NUMBER + r"\b")


def number(text: str) -> float:
    return float(text.replace("_", "").replace(",", "").rstrip("."))


def same(a: float, b) -> bool:
    return isinstance(b, (int, float)) and not isinstance(b, bool) and math.isclose(a, float(b), rel_tol=1e-9)


def field_default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def option_fields(cls: type) -> list[tuple[type, dataclasses.Field]]:
    """The CLI fields of an options dataclass, nested ones (GAConfig, LocalConfig) included."""
    found = [(cls, f) for f in cli_fields(cls)]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None):
            found += option_fields(f.type)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            found += option_fields(type(default))
    return found


def flag_of(f: dataclasses.Field) -> str:
    return (f.metadata.get("flag") or "--" + f.name.replace("_", "-")).split("/")[0]


OPTION_CLASSES = [c for c in vars(options).values()
                  if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__ == options.__name__]
FIELDS = sorted({(cls.__name__, f.name): (cls, f) for c in OPTION_CLASSES for cls, f in option_fields(c)}.items())


def dataclass_defaults() -> dict[str, list]:
    """Every flag the options dataclasses declare -> the defaults it has (one per dataclass)."""
    found: dict[str, list] = {}
    for _, (_, f) in FIELDS:
        found.setdefault(flag_of(f), []).append(field_default(f))
    return found


def command_defaults(cmd: click.Command) -> dict[str, list]:
    """A command's own flags -> the default it shows (the demo's --tokens is not capture's)."""
    return {o: [p.default] for p in cmd.params if isinstance(p, click.Option) for o in p.opts if o.startswith("--")}


def mismatches(text: str, defaults: dict[str, list], own_default=None) -> list[str]:
    """What `text` states about a default that is not the default."""
    text = " ".join(text.split())
    wrong = []
    for pattern in FLAG_PATTERNS:
        for m in pattern.finditer(text):
            flag, value = m.group(1), number(m.group(2))
            if flag in defaults and not any(same(value, d) for d in defaults[flag]):
                wrong.append(f"{m.group(0)!r}: the default of {flag} is {defaults[flag]}")
    if own_default is not None:
        for m in OWN_DEFAULT.finditer(text):
            if not same(number(m.group(1)), own_default):
                wrong.append(f"{m.group(0)!r}: the default is {own_default}")
    split = SplitOptions()
    for m in SPLIT_PART.finditer(text):
        part, share, cap = m.group(1), number(m.group(2)) / 100, number(m.group(3))
        if not (same(share, getattr(split, part)) and same(cap, getattr(split, f"max_{part}"))):
            wrong.append(f"{m.group(0)!r}: the default {part} part is {getattr(split, part)}, "
                         f"at most {getattr(split, f'max_{part}')}")
    return wrong


def uniform_cost(step: float) -> int:
    """Evaluations of the uniform binary search over the grid of `step` (1.0 is known acceptable)."""
    return math.ceil(math.log2(len(uniform_grid(step)) + 1))


def docstrings() -> list[tuple[str, str]]:
    """Every module, class and function docstring of the package."""
    found = []
    for path in sorted((ROOT / "sieve_cli").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    found.append((f"{path.relative_to(ROOT)}:{getattr(node, 'name', '<module>')}", doc))
    return found


# ---- the checker finds what it is meant to find ----------------------------------------------------
def test_the_checker_catches_a_drifted_number():
    defaults = {"--local-budget": [16], "--confidence": [0.9], "--grid-step": [0.01]}
    assert mismatches("at most --local-budget (17) evaluations", defaults)
    assert mismatches("a lower bound (`--confidence`, default 0.8, one-sided)", defaults)
    assert mismatches("uniform: dense + 7 (--grid-step 0.05)", defaults)
    assert mismatches("split into test (40%, at most 300), search (20%, at most 100)", {})
    assert mismatches("Default 2: factor every planned matrix.", {}, own_default=1.0)
    assert not mismatches("at most --local-budget (16), `--confidence`, default 0.9 (--grid-step 0.01); "
                          "test (25%, at most 300), confirm (30%, at most 400), search (25%, at most 200)", defaults)
    assert not mismatches("Default 1: factor every planned matrix.", {}, own_default=1.0)


# ---- the texts ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_help_states_the_commands_defaults(name):
    cmd = COMMANDS[name]
    defaults = command_defaults(cmd)
    wrong = mismatches(cmd.help or "", defaults)
    for param in cmd.params:
        if isinstance(param, click.Option) and param.help:
            own = param.default if isinstance(param.default, (int, float)) else None
            wrong += [f"{param.opts[0]}: {w}" for w in mismatches(param.help, defaults, own)]
    assert not wrong, f"sieve {name} --help: " + "; ".join(wrong)


@pytest.mark.parametrize("key", [k for k, _ in FIELDS], ids=lambda k: ".".join(k))
def test_option_help_states_its_dataclass_defaults(key):
    cls, f = dict(FIELDS)[key]
    own = field_default(f)
    defaults = {flag_of(g): [field_default(g)] for _, g in option_fields(cls)} | {
        k: v for k, v in dataclass_defaults().items() if k not in {flag_of(g) for _, g in option_fields(cls)}}
    wrong = mismatches(f.metadata["help"], defaults, own if isinstance(own, (int, float)) else None)
    assert not wrong, wrong


def test_docstrings_and_docs_state_the_dataclass_defaults():
    defaults = dataclass_defaults()
    texts = docstrings() + [(str(p.relative_to(ROOT)), p.read_text()) for p in
                            [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if p.exists()]
    wrong = [f"{where}: {w}" for where, text in texts for w in mismatches(text, defaults)]
    assert not wrong, "\n".join(wrong)


def test_stated_uniform_costs_are_the_grids():
    """'0.01 costs 7 evaluations, 0.05 costs 5' (--grid-step) and 'dense + 7 (--grid-step 0.01)' (search)."""
    grid_help = next(f for _, (cls, f) in FIELDS if f.name == "grid_step").metadata["help"]
    stated = [(number(a or c), number(b or d)) for a, b, c, d in GRID_COST.findall(grid_help)]
    assert len(stated) == 2, grid_help
    for step, cost in stated:
        assert uniform_cost(step) == cost, (step, cost, uniform_cost(step))
    strategy_help = " ".join(next(f for _, (cls, f) in FIELDS if f.name == "strategy").metadata["help"].split())
    default_cost = uniform_cost(options.SearchOptions().grid_step)
    assert f"binary search ({default_cost} evaluations)" in strategy_help
    search_help = " ".join(COMMANDS["search"].help.split())
    assert f"uniform: dense + {default_cost} (--grid-step {options.SearchOptions().grid_step:g})" in search_help


def test_demo_tolerance_help_states_each_builtin_tasks_tolerance():
    help_text = next(p.help for p in COMMANDS["demo"].params if "--tolerance" in p.opts)
    stated = dict((name, number(value)) for value, name in re.findall(NUMBER + r" for ([a-z_]+)", help_text))
    assert stated == {name: task.tolerance for name, task in DEMO_TASKS.items()}, help_text


MEASUREMENT = re.compile(r"\b\d+(?:\.\d+)? s\b|\bs of CPU\b|\b\d+\.\d+x\b|\bmeasured on\b", re.IGNORECASE)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_points_to_the_docs_for_measurements(name):
    """Costs measured on one machine live in docs/benchmarks.md, not in --help."""
    cmd = COMMANDS[name]
    texts = [cmd.help or ""] + [p.help or "" for p in cmd.params if isinstance(p, click.Option)]
    found = [m.group(0) for text in texts for m in MEASUREMENT.finditer(" ".join(text.split()))]
    assert not found, f"sieve {name} --help states measurements: {found}"
