"""Rendering records into examples: the task's Jinja templates, gold answers, few-shot prompts.

Templates come from task files, which may come from anyone (a received workspace holds a
copy that is rendered again), so they run in Jinja's immutable sandbox: no attribute
starting with `_`, no mutation of lists or dicts, no access to Python internals.

Gold answers follow lm-evaluation-harness: for multiple_choice an integer target (a field
holding an int, or a template rendering only digits) is an index into the choices; any
other string must be one of the choices.

Rendering is bounded too (`BoundedEnvironment`): a field's output is at most MAX_CHARS characters
and takes at most MAX_SECONDS per record, and an operator or filter asked for a result larger than
MAX_CHARS (`'x' * 10**10`, `center(10**10)`, a huge power) is refused before it allocates anything.
"""

from __future__ import annotations

import ast
import math
import re
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from ..errors import TaskError
from .spec import Task


@dataclass(frozen=True)
class Example:
    """One scored item: the context the model reads and what it should produce."""

    id: str
    context: str
    target: str  # the gold continuation (for multiple_choice, the gold choice)
    choices: tuple[str, ...] = ()
    gold: int = -1
    shared: str = ""  # the start of `context` that other examples share (description, demonstrations, delimiter)

    def text(self, delimiter: str) -> str:
        """Context + delimiter + gold target: the full text capture reads."""
        return self.context + delimiter + self.target if self.context else self.target


MAX_CHARS = 4_000_000  # characters one field may render to (a long passage fits; 10 GB does not)
MAX_SECONDS = 5.0  # per field and record: a template that loops for minutes is refused
_WIDE_FORMAT = re.compile(r"\d{8,}")  # a width or precision of 8+ digits in a format string


class TemplateLimit(Exception):
    """A template asked for more than MAX_CHARS or MAX_SECONDS."""


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with results bounded in size before they are computed."""

    intercepted_binops = frozenset(["*", "**", "%"])  # also keeps them from being folded at compile time

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.filters = {name: _bounded_call(f) for name, f in self.filters.items()}

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_CHARS:
                    raise TemplateLimit(f"{len(seq)} x {n} items")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            if right * math.log2(abs(left)) > 8 * MAX_CHARS:
                raise TemplateLimit(f"{left} ** {right}")
        elif operator == "%" and isinstance(left, str):
            _check_format(left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        _check_arguments(args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, str) and attribute in ("format", "format_map"):
            _check_format(obj, ())
        return super().getattr(obj, attribute)


def _check_arguments(args: tuple, kwargs: dict) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CHARS:
            raise TemplateLimit(f"an argument of {value}")


def _check_format(template: str, values: Any) -> None:
    if _WIDE_FORMAT.search(template):
        raise TemplateLimit("a format width of 8 or more digits")
    _check_arguments(values if isinstance(values, tuple) else (values,), {})


def _bounded_call(function):
    def bounded(*args, **kwargs):
        _check_arguments(args[1:], kwargs)  # the first is the value filtered (or the environment/context)
        return function(*args, **kwargs)

    for attribute in ("jinja_pass_arg",):  # how jinja tells filters that take the environment or context
        if hasattr(function, attribute):
            setattr(bounded, attribute, getattr(function, attribute))
    return bounded


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Interrupt the block after `seconds` (SIGALRM, main thread only; elsewhere the output bound remains)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expired(signum, frame):
        raise TemplateLimit(f"more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _render_bounded(template, record: dict) -> str:
    parts, size, started = [], 0, time.perf_counter()
    with _deadline(MAX_SECONDS):
        for chunk in template.generate(**record):
            size += len(chunk)
            if size > MAX_CHARS:
                raise TemplateLimit(f"more than {MAX_CHARS:,} characters")
            if time.perf_counter() - started > MAX_SECONDS:
                raise TemplateLimit(f"more than {MAX_SECONDS:g} s")
            parts.append(chunk)
    return "".join(parts)


class Renderer:
    """Jinja templates of one task, compiled once; a template that is exactly a field name reads the field."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self._env = BoundedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        self._cache: dict[str, Any] = {}

    def render(self, template: str, record: dict, field_name: str) -> str:
        if template in record:
            return str(record[template])
        if template not in self._cache:
            try:
                self._cache[template] = self._env.from_string(template)
            except jinja2.TemplateSyntaxError as exc:
                raise TaskError(f"task {self.task.name}: field {field_name!r} is not a valid Jinja template ({exc.message})") from None
        try:
            return _render_bounded(self._cache[template], record)
        except TemplateLimit as exc:
            raise TaskError(
                f"task {self.task.name}: field {field_name!r} asks for too much ({exc}); a field may render at most "
                f"{MAX_CHARS:,} characters in {MAX_SECONDS:g} s per record: simplify the template"
            ) from None
        except SecurityError as exc:
            raise TaskError(
                f"task {self.task.name}: field {field_name!r} uses what templates may not ({exc}); "
                f"templates may read fields, not Python internals"
            ) from None
        except jinja2.UndefinedError as exc:
            raise TaskError(
                f"task {self.task.name}: field {field_name!r}: {exc.message}; the record's fields are {', '.join(map(str, record))}"
            ) from None
        except Exception as exc:  # a template expression failed on this record (index, key, type)
            raise TaskError(f"task {self.task.name}: field {field_name!r} failed on a record ({type(exc).__name__}: {exc})") from None

    def choices(self, record: dict) -> tuple[str, ...]:
        spec = self.task.doc_to_choice
        if isinstance(spec, list):
            return tuple(self.render(str(c), record, "doc_to_choice") for c in spec)
        if spec in record and isinstance(record[spec], list):
            return tuple(map(str, record[spec]))
        rendered = self.render(spec, record, "doc_to_choice")
        try:
            value = ast.literal_eval(rendered.strip())
        except (ValueError, SyntaxError):
            value = None
        if not isinstance(value, (list, tuple)) or not value:
            raise TaskError(f"task {self.task.name}: field 'doc_to_choice' rendered {rendered[:80]!r}, not a list of choices")
        return tuple(map(str, value))

    def target_value(self, record: dict) -> Any:
        """doc_to_target as lm-eval reads it for multiple_choice: a field's own value (an int stays
        an int, a string stays text), else the rendered template, an int when it is all digits."""
        template = self.task.doc_to_target
        if template in record:
            return record[template]
        rendered = self.render(template, record, "doc_to_target")
        return int(rendered) if rendered.isdigit() else rendered

    def gold_index(self, target: Any, choices: tuple[str, ...]) -> int:
        """An int is an index into the choices, never matched as choice text; a string is the choice
        itself (a string of digits that is no choice is read as an index, where lm-eval would fail)."""
        if isinstance(target, str) and target not in choices and target.strip().isdigit():
            target = int(target.strip())
        if isinstance(target, int) and not isinstance(target, bool):
            if 0 <= target < len(choices):
                return target
            raise TaskError(
                f"task {self.task.name}: field 'doc_to_target' gave index {target}, but there are only {len(choices)} choices"
            )
        if str(target) in choices:
            return choices.index(str(target))
        raise TaskError(
            f"task {self.task.name}: field 'doc_to_target' gave {target!r}, neither a choice ({', '.join(choices)}) nor an index"
        )

    def gold(self, record: dict) -> tuple[tuple[str, ...], int]:
        """The choices of a multiple_choice record and the index of its gold answer."""
        choices = self.choices(record)
        return choices, self.gold_index(self.target_value(record), choices)

    def shot(self, record: dict) -> str:
        """One few-shot demonstration: question, delimiter and gold answer."""
        context = self.render(self.task.doc_to_text, record, "doc_to_text")
        if self.task.output_type == "multiple_choice":
            choices, gold = self.gold(record)
            target = choices[gold]
        else:
            target = self.render(self.task.doc_to_target, record, "doc_to_target")
        return context + self.task.target_delimiter + target

    def example(self, id_: str, record: dict, shots: list[dict]) -> Example:
        task = self.task
        context = self.render(task.doc_to_text, record, "doc_to_text")
        prefix = [task.description] if task.description else []
        prefix += [self.shot(s) for s in shots]
        shared = task.fewshot_delimiter.join(prefix) + task.fewshot_delimiter if prefix else ""
        context = shared + context
        if task.output_type == "multiple_choice":
            choices, gold = self.gold(record)
            return Example(id_, context, choices[gold], choices, gold, shared)
        return Example(id_, context, self.render(task.doc_to_target, record, "doc_to_target"), (), shared=shared)
