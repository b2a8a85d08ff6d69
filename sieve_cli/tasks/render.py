"""Rendering records into examples: the task's Jinja templates, gold answers, few-shot prompts.

Templates come from task files, which may come from anyone (a received workspace holds a
copy that is rendered again), so they run in Jinja's immutable sandbox: no attribute
starting with `_`, no mutation of lists or dicts, no access to Python internals.

Gold answers follow lm-evaluation-harness: for multiple_choice an integer target (a field
holding an int, or a template rendering only digits) is an index into the choices; any
other string must be one of the choices.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any

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


class Renderer:
    """Jinja templates of one task, compiled once; a template that is exactly a field name reads the field."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self._env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
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
            return self._cache[template].render(**record)
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
