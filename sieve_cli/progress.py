"""Progress bars that library code may use and that only the CLI turns on.

Library functions call `track(...)` or `bar(...)`; they stay silent unless the CLI
has called `enable()`, so notebooks and tests get no terminal output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
_enabled = False


def enable(on: bool = True) -> None:
    global _enabled
    _enabled = on


def is_enabled() -> bool:
    return _enabled


class _Bar:
    """A handle on one progress task: `advance(n)` and `note(text)` (e.g. a rate)."""

    def __init__(self, progress: Progress | None, task_id) -> None:
        self._progress, self._task = progress, task_id

    def advance(self, n: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def note(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, note=text)


@contextlib.contextmanager
def bar(description: str, total: float | None, completed: float = 0) -> Iterator[_Bar]:
    """A progress bar over `total` units (tokens, matrices, evaluations...)."""
    if not _enabled:
        yield _Bar(None, None)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        task_id = progress.add_task(description, total=total, completed=completed, note="")
        yield _Bar(progress, task_id)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over `items` with a progress bar when progress is enabled."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with bar(description, total) as b:
        for item in items:
            yield item
            b.advance()
