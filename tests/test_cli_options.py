"""The CLI's options come from the stages' dataclasses: one default, one meaning per flag, a default workspace."""

import dataclasses
import subprocess
import sys
import typing

import click
import pytest
import typer.main
from typer.testing import CliRunner

from sieve_cli.cli import app
from sieve_cli.commands.common import file_size
from sieve_cli.options import (
    ApplyOptions,
    CaptureOptions,
    DiscoverOptions,
    EvalOptions,
    FitOptions,
    GAConfig,
    ReportOptions,
    RunOptions,
    SearchOptions,
    SplitOptions,
)

COMMANDS = typer.main.get_command(app).commands
ALL = None
# each command and the options dataclasses its flags come from (with the fields it takes from each)
SOURCES = {
    "discover": [(DiscoverOptions, ALL)],
    "capture": [(CaptureOptions, ALL), (SplitOptions, ALL)],
    "fit": [(FitOptions, ("levels", "init", "lr", "max_steps", "tol", "decays", "factor_dtype", "seed", "device"))],
    "search": [(SearchOptions, ALL), (GAConfig, ALL)],
    "apply": [(ApplyOptions, ALL)],
    "eval": [(EvalOptions, ALL), (SplitOptions, ALL)],
    "report": [(ReportOptions, ALL)],
    "run": [(RunOptions, ("device", "dtype")), (CaptureOptions, ("tokens", "seq_len")), (FitOptions, ("method",)),
            (SearchOptions, ("strategy", "tolerance", "absolute", "levels", "grid_step", "limit", "workers",
                             "worker_threads", "ray_address")),
            (GAConfig, ALL), (SplitOptions, ALL)],
}


def flag_of(f: dataclasses.Field) -> str:
    return (f.metadata.get("flag") or "--" + f.name.replace("_", "-")).split("/")[0]  # "--on/--off": the first


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_with_examples(name):
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert "Example" in result.output, f"`sieve {name} --help` shows no example"


def test_no_short_flag_has_two_meanings():
    meaning: dict[str, tuple[str, str]] = {}
    for command, cmd in COMMANDS.items():
        for param in cmd.params:
            if not isinstance(param, click.Option):
                continue
            shorts = [o for o in param.opts if not o.startswith("--")]
            longs = [o for o in param.opts if o.startswith("--")]
            for short in shorts:
                first = meaning.setdefault(short, (longs[0], command))
                assert first[0] == longs[0], f"{short} is {first[0]} in `{first[1]}` but {longs[0]} in `{command}`"


def test_no_command_declares_a_flag_twice():
    for command, cmd in COMMANDS.items():
        flags = [o for p in cmd.params for o in p.opts]
        assert len(flags) == len(set(flags)), (command, sorted(f for f in flags if flags.count(f) > 1))


@pytest.mark.parametrize("command", sorted(SOURCES))
def test_cli_defaults_are_the_dataclass_defaults(command):
    """Each flag a dataclass declares shows the dataclass's default (in the value the CLI parses back)."""
    params = {o: p for p in COMMANDS[command].params for o in p.opts}
    checked = 0
    for cls, only in SOURCES[command]:
        for f in dataclasses.fields(cls):
            if "help" not in f.metadata or (only is not None and f.name not in only):
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = params[flag_of(f)].default
            parse = f.metadata.get("parse")
            assert (parse(shown) if parse else shown) == default, (command, f.name, shown, default)
            checked += 1
    assert checked >= 1


def test_shared_options_are_spelled_and_explained_the_same_everywhere():
    for flag in ("--workspace", "--task", "--data-root", "--device", "--dtype", "--limit", "--json", "--force",
                 "--seed", "--split-seed", "--method", "--out"):
        helps = {}
        for command, cmd in COMMANDS.items():
            for p in cmd.params:
                if flag in p.opts:
                    helps[command] = (tuple(p.opts), p.help.split("(default")[0].split(" (")[0][:40]
                                      if flag in ("--dtype", "--seed") else p.help)
        opts = {v[0] for v in helps.values()}
        assert len(opts) == 1, (flag, helps)
        if flag not in ("--seed", "--out", "--method"):  # what they seed / write / fit is the command's own
            assert len({v[1] for v in helps.values()}) == 1, (flag, helps)


def test_run_offers_what_the_stages_offer():
    run = {o for p in COMMANDS["run"].params for o in p.opts}
    for flag in ("--task", "--data-root", "--device", "--dtype", "--limit", "--tokens", "--strategy", "--tolerance",
                 "--method", "--population", "--search-size", "--max-test", "--split-seed"):
        assert flag in run, flag


def test_options_dataclasses_have_one_generations_default():
    """Once three configs disagreed (12, 8, 30): now the CLI, search and the API read one."""
    from sieve_cli.api import LLMSieveConfig

    assert SearchOptions().ga.generations == GAConfig().generations == LLMSieveConfig().ga_generations
    assert SearchOptions().ga.population == GAConfig().population == LLMSieveConfig().ga_population_size


def test_limit_zero_means_the_whole_part_in_every_command():
    assert SearchOptions(limit=0).limit is None and EvalOptions(limit=0).limit is None
    for cls in (SearchOptions, EvalOptions):
        with pytest.raises(Exception, match="--limit"):
            cls(limit=-1)


@pytest.mark.parametrize("bad, flag", [(dict(device="nonsense"), "--device"), (dict(dtype="int3"), "--dtype")])
def test_bad_device_and_dtype_name_the_flag(bad, flag):
    for cls in (CaptureOptions, SearchOptions, EvalOptions):
        with pytest.raises(Exception, match=flag):
            cls(**bad)


def test_nan_split_size_is_one_line():
    result = CliRunner().invoke(app, ["eval", "--task", "x.yaml", "--search-size", "nan"])
    assert result.exit_code == 1 and "--search-size" in result.output and "Traceback" not in result.output


def test_commands_use_and_name_the_default_workspace(default_workspace):
    result = CliRunner().invoke(app, ["fit"])  # nothing captured yet in the default workspace
    assert result.exit_code == 1
    assert f"workspace: {default_workspace}" in " ".join(result.output.split())
    assert "sieve discover" in result.output  # the missing upstream names its command


def test_help_loads_neither_torch_nor_matplotlib():
    code = ("import sys; from typer.testing import CliRunner; from sieve_cli.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0; "
            "[CliRunner().invoke(app, [c, '--help']) for c in ('search', 'run', 'report')]; "
            "print(sorted(m for m in ('torch', 'matplotlib', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_byte_sizes_have_one_format():
    assert file_size(538_123_456) == "513.2 MiB"
    assert file_size(1.5 * 2**30) == "1.5 GiB"
    assert file_size(512) == "512 B"


def test_options_types_are_plain():
    """Every CLI field has a type the derivation knows (no silent str for a number)."""
    for cls in (DiscoverOptions, CaptureOptions, FitOptions, SearchOptions, GAConfig, ApplyOptions, EvalOptions,
                ReportOptions, SplitOptions):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if "help" in f.metadata and f.metadata.get("parse") is None:
                kind = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
                assert kind[0] in (int, float, str, bool) or "Path" in str(kind[0]), (cls.__name__, f.name, kind)
