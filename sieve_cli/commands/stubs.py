"""Stages not built yet: they exist so `--help` lists the whole pipeline, and exit non-zero."""

from __future__ import annotations

import typer

from .common import err_console


def not_implemented(stage: str):
    def command() -> None:
        err_console.print(f"[bold red]error:[/] sieve {stage} is not implemented yet")
        raise typer.Exit(2)

    command.__doc__ = f"(not implemented yet) the {stage} stage."
    return command
