"""Tasks: the YAML task file, its data, the calibration/search/test split, and stage `task`.

A task file uses lm-evaluation-harness field names where they apply (`dataset_path`,
`data_files`, `doc_to_text`, `doc_to_target`, `doc_to_choice`, `output_type`,
`target_delimiter`, `num_fewshot`, `generation_kwargs.until`). `bind_task` copies the
task into the workspace with every data path made absolute, splits its examples by a
seeded shuffle into disjoint calibration, search and test parts, and records the ids in
`WS/task/split.json`, so capture, search and eval all read the same examples.

Data paths: `{data_root}` inside a `data_files` entry is the data root, which is, in
order: the `data_root` argument (the CLI's `--data-root`), `$SIEVE_DATA_ROOT`, or the
nearest `shared/data` folder found walking up from the task file's folder. Other
relative paths resolve against the task file's folder.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import os
import random
import sysconfig
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError, MissingStageError, TaskError
from .files import sha256_json, write_json_atomic
from .options import SplitOptions
from .workspace import Stage, Workspace

log = logging.getLogger(__name__)

STAGE = Stage.TASK
DEFAULT_TASK = Path(__file__).resolve().parent / "builtin_tasks" / "python_stdlib.yaml"
DATA_ROOT_ENV = "SIEVE_DATA_ROOT"
OUTPUT_TYPES = ("multiple_choice", "generate_until", "text_modelling")
PARTS = ("calibration", "search", "confirm", "test")
LOCAL_BUILDERS = ("json", "csv", "text", "python_stdlib")

_KNOWN_FIELDS = {
    "task", "dataset_path", "dataset_name", "data_files", "dataset_kwargs", "split", "test_split",
    "fewshot_split", "id_field", "output_type", "doc_to_text", "doc_to_target", "doc_to_choice",
    "target_delimiter", "fewshot_delimiter", "description", "num_fewshot", "generation_kwargs",
    "metadata", "sieve",
}


# ---- the task file -----------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A parsed task file. Paths in `data_files` are absolute once resolved."""

    name: str
    dataset_path: str
    output_type: str
    doc_to_text: str
    doc_to_target: str
    doc_to_choice: Any = None  # a list of templates, or one template that renders a list
    dataset_name: str | None = None
    data_files: Any = None  # str | list[str] | dict[str, str | list[str]]
    dataset_kwargs: dict = field(default_factory=dict)
    split: str | None = None
    fewshot_split: str | None = None
    id_field: str | None = None
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    description: str = ""
    num_fewshot: int = 0
    until: tuple[str, ...] = ("\n\n",)
    max_gen_toks: int = 64
    source: str | None = None  # the file it was read from
    data_root: str | None = None  # the data root used to resolve `{data_root}`

    def to_yaml_dict(self) -> dict:
        """The lm-eval-style mapping written to WS/task/task.yaml (paths already absolute)."""
        out = {"task": self.name, "dataset_path": self.dataset_path}
        for key in ("dataset_name", "data_files", "split", "fewshot_split", "id_field"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.dataset_kwargs:
            out["dataset_kwargs"] = dict(self.dataset_kwargs)
        out.update(output_type=self.output_type, doc_to_text=self.doc_to_text, doc_to_target=self.doc_to_target)
        if self.doc_to_choice is not None:
            out["doc_to_choice"] = self.doc_to_choice
        out.update(target_delimiter=self.target_delimiter, fewshot_delimiter=self.fewshot_delimiter)
        if self.description:
            out["description"] = self.description
        out["num_fewshot"] = self.num_fewshot
        out["generation_kwargs"] = {"until": list(self.until), "max_gen_toks": self.max_gen_toks}
        out["sieve"] = {"source": self.source, "data_root": self.data_root}
        return out

    def identity(self) -> str:
        """Hash of what defines the examples and their scoring (not where the file lives)."""
        body = self.to_yaml_dict()
        body.pop("sieve")
        return sha256_json(body)


def find_data_root(task_file: Path | None, data_root: str | os.PathLike | None = None) -> Path | None:
    """The data root: the argument, else $SIEVE_DATA_ROOT, else the nearest `shared/data` above the task file."""
    if data_root:
        return Path(data_root).expanduser().resolve()
    if os.environ.get(DATA_ROOT_ENV):
        return Path(os.environ[DATA_ROOT_ENV]).expanduser().resolve()
    if task_file is not None:
        for folder in Path(task_file).resolve().parents:
            if (folder / "shared" / "data").is_dir():
                return folder / "shared" / "data"
    return None


def load_task(path: str | os.PathLike, data_root: str | os.PathLike | None = None) -> Task:
    """Parse and validate a task file; errors name the field at fault."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"no such task file: {path}; pass a YAML task file with --task")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise TaskError(f"task file {path} is not valid YAML ({str(exc).splitlines()[0]}); fix its syntax") from None
    if not isinstance(raw, dict):
        raise TaskError(f"task file {path} must be a mapping of fields (dataset_path, output_type, ...)")
    return parse_task(raw, path.resolve(), data_root)


def parse_task(raw: dict, path: Path, data_root: str | os.PathLike | None = None) -> Task:
    where = f"task file {path}"
    unknown = sorted(set(raw) - _KNOWN_FIELDS)
    if unknown:
        raise TaskError(f"{where}: unknown field {unknown[0]!r}; known fields: {', '.join(sorted(_KNOWN_FIELDS))}")
    for key in ("dataset_path", "output_type", "doc_to_target"):
        if raw.get(key) in (None, ""):
            raise TaskError(f"{where}: field {key!r} is missing; add it")
    output_type = raw["output_type"]
    if output_type not in OUTPUT_TYPES:
        raise TaskError(f"{where}: field 'output_type' is {output_type!r}; use one of {', '.join(OUTPUT_TYPES)}")
    if output_type == "multiple_choice" and raw.get("doc_to_choice") is None:
        raise TaskError(f"{where}: field 'doc_to_choice' is missing; multiple_choice needs the list of choices")
    for key in ("doc_to_text", "doc_to_target", "target_delimiter", "fewshot_delimiter", "description"):
        if key in raw and not isinstance(raw[key], (str, int)):
            raise TaskError(f"{where}: field {key!r} must be a string (a Jinja template or a field name)")
    choice = raw.get("doc_to_choice")
    if choice is not None and not isinstance(choice, (str, list)):
        raise TaskError(f"{where}: field 'doc_to_choice' must be a list of strings or a template rendering a list")
    gen = raw.get("generation_kwargs") or {}
    if not isinstance(gen, dict):
        raise TaskError(f"{where}: field 'generation_kwargs' must be a mapping (until, max_gen_toks)")
    until = gen.get("until", ["\n\n"])
    until = [until] if isinstance(until, str) else until
    if not isinstance(until, list) or not all(isinstance(u, str) and u for u in until):
        raise TaskError(f"{where}: field 'generation_kwargs.until' must be a non-empty string or list of strings")
    num_fewshot = raw.get("num_fewshot", 0) or 0
    if not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise TaskError(f"{where}: field 'num_fewshot' must be a whole number >= 0")
    max_gen = gen.get("max_gen_toks", 64)
    if not isinstance(max_gen, int) or max_gen < 1:
        raise TaskError(f"{where}: field 'generation_kwargs.max_gen_toks' must be a whole number >= 1")
    kwargs = raw.get("dataset_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise TaskError(f"{where}: field 'dataset_kwargs' must be a mapping")
    data_files = raw.get("data_files", kwargs.pop("data_files", None))
    sieve_meta = raw.get("sieve") or {}
    root = find_data_root(path, data_root or sieve_meta.get("data_root"))
    uses_root = "{data_root}" in json.dumps(data_files)
    if uses_root and root is None:
        raise TaskError(
            f"{where}: field 'data_files' uses {{data_root}} but no data root was found; "
            f"set ${DATA_ROOT_ENV} or pass --data-root"
        )
    data_files = _resolve_files(data_files, path.parent, root, where)
    split = raw.get("split", raw.get("test_split"))
    if isinstance(data_files, dict) and split is None:
        raise TaskError(f"{where}: field 'split' is missing; name which of {', '.join(data_files)} holds the examples")
    if isinstance(data_files, dict) and split not in data_files:
        raise TaskError(f"{where}: field 'split' is {split!r} but 'data_files' has only {', '.join(data_files)}")
    fewshot_split = raw.get("fewshot_split")
    if fewshot_split is not None and isinstance(data_files, dict) and fewshot_split not in data_files:
        raise TaskError(f"{where}: field 'fewshot_split' is {fewshot_split!r} but 'data_files' has only {', '.join(data_files)}")
    return Task(
        name=str(raw.get("task") or path.stem),
        dataset_path=str(raw["dataset_path"]),
        output_type=output_type,
        doc_to_text=str(raw.get("doc_to_text", "")),
        doc_to_target=str(raw["doc_to_target"]),
        doc_to_choice=choice,
        dataset_name=raw.get("dataset_name"),
        data_files=data_files,
        dataset_kwargs=kwargs,
        split=split,
        fewshot_split=fewshot_split,
        id_field=raw.get("id_field"),
        target_delimiter=str(raw.get("target_delimiter", " ")),
        fewshot_delimiter=str(raw.get("fewshot_delimiter", "\n\n")),
        description=str(raw.get("description", "")),
        num_fewshot=num_fewshot,
        until=tuple(until),
        max_gen_toks=max_gen,
        source=str(sieve_meta.get("source") or path),
        data_root=str(root) if (root is not None and uses_root) else sieve_meta.get("data_root"),
    )


def _resolve_files(files: Any, base: Path, root: Path | None, where: str) -> Any:
    if files is None:
        return None
    if isinstance(files, dict):
        return {str(k): _resolve_files(v, base, root, where) for k, v in files.items()}
    if isinstance(files, list):
        return [_resolve_files(v, base, root, where) for v in files]
    if not isinstance(files, str):
        raise TaskError(f"{where}: field 'data_files' must be a path, a list of paths or a mapping split -> path")
    text = files.replace("{data_root}", str(root)) if root is not None else files
    return str((base / Path(text).expanduser()).resolve())


# ---- the data ------------------------------------------------------------------------------


def read_records(task: Task, split: str | None = None) -> list[dict]:
    """The records of one dataset split (`task.split` by default), each a dict of fields."""
    split = split or task.split
    if task.dataset_path == "python_stdlib":
        return stdlib_records(**task.dataset_kwargs)
    if task.dataset_path in LOCAL_BUILDERS:
        files = task.data_files[split] if isinstance(task.data_files, dict) else task.data_files
        if not files:
            raise TaskError(f"task {task.name}: field 'data_files' is missing; local builder {task.dataset_path!r} needs files")
        files = [files] if isinstance(files, str) else files
        records = []
        for f in files:
            if not Path(f).is_file():
                raise TaskError(f"task {task.name}: data file {f} does not exist; check 'data_files' or the data root (${DATA_ROOT_ENV})")
            records.extend(_read_local(task.dataset_path, Path(f), task.dataset_kwargs))
        return records
    return _read_hub(task, split)


def _read_local(builder: str, path: Path, kwargs: dict) -> list[dict]:
    encoding = kwargs.get("encoding", "utf-8")
    text = path.read_text(encoding=encoding)
    if builder == "text":
        return [{"text": line} for line in text.splitlines() if line.strip()]
    if builder == "csv":
        quoting = kwargs.get("quoting", csv.QUOTE_MINIMAL)
        reader = csv.DictReader(text.splitlines(), delimiter=kwargs.get("delimiter", kwargs.get("sep", ",")), quoting=int(quoting))
        return [dict(row) for row in reader]
    return _read_json(text, path)


def _read_json(text: str, path: Path) -> list[dict]:
    """JSON Lines, a JSON list of records, or a JSON object keyed by id (the key becomes field `id`)."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        return list(json.loads(text))
    if stripped.startswith("{"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSON Lines
        if isinstance(whole, dict) and whole and all(isinstance(v, dict) for v in whole.values()):
            return [{"id": key, **value} for key, value in whole.items()]
        if isinstance(whole, dict):
            return [whole]
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise TaskError(f"data file {path} is neither JSON nor JSON Lines ({exc})") from None


def _read_hub(task: Task, split: str | None) -> list[dict]:
    import datasets

    try:
        data = datasets.load_dataset(
            task.dataset_path, task.dataset_name, data_files=task.data_files, split=split or "test", **task.dataset_kwargs
        )
    except Exception as exc:  # datasets raises many types; all mean "could not get the data"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TaskError(f"task {task.name}: could not load dataset {task.dataset_path!r} ({first[:200]}); check 'dataset_path' or use local files") from None
    return [dict(row) for row in data]


STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


def stdlib_records(max_chars: int = 1200, min_chars: int = 200) -> list[dict]:
    """One record per .py file of this Python's standard library (tests excluded): `path`, `text`.

    `text` is the file's beginning, cut at a line end near `max_chars` so examples stay short
    enough to evaluate often; files shorter than `min_chars` (empty `__init__`s) are skipped.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    records = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in STDLIB_SKIP_DIRS for part in rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) < min_chars:
            continue
        if len(text) > max_chars:
            cut = text.rfind("\n", 0, max_chars)
            text = text[: cut + 1 if cut > max_chars // 2 else max_chars]
        records.append({"path": rel.as_posix(), "text": text})
    return records


# ---- rendering records into examples --------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One scored item: the context the model reads and what it should produce."""

    id: str
    context: str
    target: str  # the gold continuation (for multiple_choice, the gold choice)
    choices: tuple[str, ...] = ()
    gold: int = -1

    def text(self, delimiter: str) -> str:
        """Context + delimiter + gold target: the full text capture reads."""
        return self.context + delimiter + self.target if self.context else self.target


class Renderer:
    """Jinja templates of one task, compiled once; a template that is exactly a field name reads the field."""

    def __init__(self, task: Task) -> None:
        import jinja2

        self.task = task
        self._env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        self._cache: dict[str, Any] = {}

    def render(self, template: str, record: dict, field_name: str) -> str:
        import jinja2

        if template in record:
            value = record[template]
            return str(value)
        if template not in self._cache:
            try:
                self._cache[template] = self._env.from_string(template)
            except jinja2.TemplateSyntaxError as exc:
                raise TaskError(f"task {self.task.name}: field {field_name!r} is not a valid Jinja template ({exc.message})") from None
        try:
            return self._cache[template].render(**record)
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

    def gold_index(self, target: str, choices: tuple[str, ...]) -> int:
        if target in choices:
            return choices.index(target)
        stripped = target.strip()
        if stripped.lstrip("-").isdigit() and 0 <= int(stripped) < len(choices):
            return int(stripped)
        raise TaskError(
            f"task {self.task.name}: field 'doc_to_target' gave {target!r}, neither a choice ({', '.join(choices)}) nor its index"
        )

    def shot(self, record: dict) -> str:
        """One few-shot demonstration: question, delimiter and gold answer."""
        context = self.render(self.task.doc_to_text, record, "doc_to_text")
        target = self.render(self.task.doc_to_target, record, "doc_to_target")
        if self.task.output_type == "multiple_choice":
            choices = self.choices(record)
            target = choices[self.gold_index(target, choices)]
        return context + self.task.target_delimiter + target

    def example(self, id_: str, record: dict, shots: list[dict]) -> Example:
        task = self.task
        context = self.render(task.doc_to_text, record, "doc_to_text")
        prefix = [task.description] if task.description else []
        prefix += [self.shot(s) for s in shots]
        if prefix:
            context = task.fewshot_delimiter.join(prefix + [context])
        target = self.render(task.doc_to_target, record, "doc_to_target")
        if task.output_type == "multiple_choice":
            choices = self.choices(record)
            gold = self.gold_index(target, choices)
            return Example(id_, context, choices[gold], choices, gold)
        return Example(id_, context, target)


# ---- splits --------------------------------------------------------------------------------


def make_split(ids: list[str], options: SplitOptions) -> dict[str, list[str]]:
    """Disjoint parts of `ids` by one seeded shuffle; the same ids and options give the same parts."""
    sizes = options.sizes(len(ids))
    order = list(ids)
    random.Random(options.seed).shuffle(order)
    parts, start = {}, 0
    for name in ("test", "confirm", "search", "calibration"):  # the draw order: test first, so it never moves
        parts[name] = order[start : start + sizes[name]]
        start += sizes[name]
    return parts


def record_ids(task: Task, records: list[dict]) -> list[str]:
    """Stable ids of records: the `id_field` value (which must be unique), else the row number."""
    if task.id_field is None:
        return [str(i) for i in range(len(records))]
    try:
        ids = [str(r[task.id_field]) for r in records]
    except KeyError:
        raise TaskError(f"task {task.name}: field 'id_field' names {task.id_field!r}, which some records lack") from None
    if len(set(ids)) != len(ids):
        raise TaskError(f"task {task.name}: field 'id_field' ({task.id_field!r}) is not unique; drop it to number rows instead")
    return ids


# ---- the bound task --------------------------------------------------------------------------


class BoundTask:
    """A task bound to a workspace: its records, split, few-shot examples and rendered examples."""

    def __init__(self, task: Task, split: dict, records: dict[str, dict] | None = None) -> None:
        self.task = task
        self.split = split  # the contents of split.json
        self._records = records
        self._renderer = Renderer(task)

    @property
    def output_type(self) -> str:
        return self.task.output_type

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def records(self) -> dict[str, dict]:
        if self._records is None:
            records = read_records(self.task)
            self._records = dict(zip(record_ids(self.task, records), records))
        return self._records

    @cached_property
    def _shots(self) -> list[tuple[str, dict]]:
        """The few-shot pool, in draw order (num_fewshot + 1, so an example never demonstrates itself)."""
        ids = self.split.get("fewshot", [])
        if self.task.fewshot_split is not None:
            pool = read_records(self.task, self.task.fewshot_split)
            return [(i, pool[int(i.split(":", 1)[1])]) for i in ids]
        return [(i, self.records[i]) for i in ids]

    def ids(self, part: str) -> list[str]:
        if part not in PARTS:
            raise InputError(f"unknown split part {part!r}; use one of {', '.join(PARTS)}")
        return list(self.split["ids"].get(part, []))  # workspaces bound before the confirm part have none

    def examples(self, part: str) -> list[Example]:
        """The rendered examples of one part, in split order."""
        missing = [i for i in self.ids(part) if i not in self.records]
        if missing:
            raise TaskError(
                f"task {self.name}: the data no longer holds example {missing[0]!r} of the bound split; "
                f"rebind with `--task ... --force`"
            )
        k = self.task.num_fewshot
        out = []
        for id_ in self.ids(part):
            shots = [rec for sid, rec in self._shots if sid != id_][:k]
            out.append(self._renderer.example(id_, self.records[id_], shots))
        return out

    def texts(self, part: str) -> list[str]:
        """Full text per example (context + delimiter + gold target): what capture reads."""
        return [e.text(self.task.target_delimiter) for e in self.examples(part)]


def draw_fewshot(task: Task, split: dict[str, list[str]], seed: int) -> list[str]:
    """Ids of the few-shot pool: from `fewshot_split` if given, else from calibration, never search or test."""
    k = task.num_fewshot
    if k == 0:
        return []
    rng = random.Random(f"fewshot-{seed}")
    if task.fewshot_split is not None:
        n = len(read_records(task, task.fewshot_split))
        return [f"{task.fewshot_split}:{i}" for i in rng.sample(range(n), min(k + 1, n))]
    pool = sorted(split["calibration"])
    if len(pool) < k + 1:
        raise TaskError(f"task {task.name}: num_fewshot {k} needs at least {k + 1} calibration examples")
    return rng.sample(pool, k + 1)


def bind_task(
    ws: Workspace,
    task_path: str | os.PathLike | None,
    force: bool = False,
    split: SplitOptions | None = None,
    data_root: str | os.PathLike | None = None,
) -> BoundTask:
    """Bind a task file to the workspace (stage `task`), or with None return the bound one."""
    if task_path is None:
        if not ws.task_yaml.exists() or not (ws.read_manifest(STAGE) or {}).get("complete"):
            raise MissingStageError(f"workspace {ws.root} has no task; pass one with --task TASK.yaml (e.g. {DEFAULT_TASK.name})")
        if split is None:
            return load_bound_task(ws)
        task_path = ws.task_yaml
    task = load_task(task_path, data_root)
    options = split or _recorded_split(ws, task) or SplitOptions()
    records = read_records(task)
    ids = record_ids(task, records)
    inputs = {"task": task.identity(), "split": asdict(options), "data": sha256_json(records)}
    if not ws.begin(STAGE, inputs, force):
        return load_bound_task(ws)
    parts = make_split(ids, options)
    content = {
        "schema": 1,
        "task": task.name,
        "options": asdict(options),
        "counts": {p: len(v) for p, v in parts.items()},
        "ids": parts,
        "fewshot": draw_fewshot(task, parts, options.seed),
    }
    ws.task_yaml.parent.mkdir(parents=True, exist_ok=True)
    ws.task_yaml.write_text(yaml.safe_dump(task.to_yaml_dict(), sort_keys=False, allow_unicode=True))
    write_json_atomic(ws.split_json, content)
    summary = {"task": task.name, "output_type": task.output_type, "source": task.source, "data_root": task.data_root, **content["counts"]}
    ws.finish(STAGE, inputs, [ws.task_yaml, ws.split_json], summary)
    log.info("bound task %s: %s", task.name, ", ".join(f"{p} {n}" for p, n in content["counts"].items()))
    return BoundTask(task, content, dict(zip(ids, records)))


def _recorded_split(ws: Workspace, task: Task) -> SplitOptions | None:
    """The split options already used for this same task in the workspace, so that a later
    `capture --task T` keeps the sizes an earlier `eval --task T --search-size ...` chose."""
    manifest = ws.read_manifest(STAGE)
    if not manifest or (manifest.get("inputs") or {}).get("task") != json.loads(json.dumps(task.identity(), default=str)):
        return None
    return SplitOptions(**manifest["inputs"]["split"])


def load_bound_task(ws: Workspace) -> BoundTask:
    """The task bound to the workspace, read from WS/task (its copy of the task file and split)."""
    ws.require(STAGE)
    task = load_task(ws.task_yaml)
    split = json.loads(ws.split_json.read_text())
    return BoundTask(task, split)
