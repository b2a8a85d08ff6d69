"""The `sieve` command line: a thin Typer layer over the stage functions."""

from __future__ import annotations

from typing import Annotated

import typer

from .commands import common
from .commands.apply import apply
from .commands.capture import capture
from .commands.discover import discover
from .commands.eval import eval as eval_command
from .commands.fit import fit
from .commands.heal import heal
from .commands.report import report
from .commands.run import demo, run
from .commands.search import search

app = typer.Typer(
    name="sieve",
    help=(
        "Prune a Hugging Face causal LM down to what one task needs (LLM-Sieve).\n\n"
        "Stages: discover -> capture -> fit -> search -> (heal) -> apply -> eval, each reading and "
        "writing a workspace folder (-w)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or info logs.")] = False,
) -> None:
    common.setup(debug, quiet)


app.command("discover")(discover)
app.command("capture")(capture)
app.command("fit")(fit)
app.command("search")(search)
app.command("heal")(heal)
app.command("apply")(apply)
app.command("eval")(eval_command)
app.command("run")(run)
app.command("report")(report)
app.command("demo")(demo)


def main() -> None:
    app()
