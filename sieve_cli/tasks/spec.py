"""The task file: reading it safely, validating its fields, and the `Task` it describes.

A task file uses lm-evaluation-harness field names where they apply (`dataset_path`,
`data_files`, `dataset_kwargs`, `doc_to_text`, `doc_to_target`, `doc_to_choice`,
`output_type`, `target_delimiter`, `num_fewshot`, `fewshot_config.sampler`,
`generation_kwargs.until`).

Data paths: `{data_root}` inside a `data_files` entry is the data root, which is, in
order: the `data_root` argument (the CLI's `--data-root`), `$SIEVE_DATA_ROOT`, or the
nearest `shared/data` folder found walking up from the task file's folder. Other
relative paths resolve against the task file's folder.

The file is untrusted input (a workspace received from someone else holds a copy): it is
read with a size limit, decoded as strict UTF-8, and parsed by a YAML loader that refuses
aliases expanding past a node limit (the "billion laughs" bomb), so a hostile file fails
fast with one line instead of exhausting memory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError, TaskError
from ..files import sha256_json

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin_tasks"
# Task files that need no data (their records are generated): name -> file. The first is the default.
BUILTIN_TASKS = {"reviews": BUILTIN_DIR / "reviews.yaml", "python_stdlib": BUILTIN_DIR / "python_stdlib.yaml"}
DEFAULT_TASK = BUILTIN_TASKS["reviews"]
STDLIB_TASK = BUILTIN_TASKS["python_stdlib"]
DATA_ROOT_ENV = "SIEVE_DATA_ROOT"
OUTPUT_TYPES = ("multiple_choice", "generate_until", "text_modelling")
# How few-shot demonstrations are drawn (`fewshot_config: {sampler: ...}`): lm-eval's
# `default` (seeded random draw) and `first_n` (the first n in data order), and `balanced`
# (one demonstration per class in turn; multiple_choice only).
FEWSHOT_SAMPLERS = ("default", "first_n", "balanced")
MAX_TASK_BYTES = 1 << 20  # a task file is a few hundred bytes; 1 MiB leaves ample room
MAX_YAML_NODES = 100_000  # nodes after alias expansion; a real task file has under 100

_KNOWN_FIELDS = {
    "task", "dataset_path", "dataset_name", "data_files", "dataset_kwargs", "split", "test_split",
    "fewshot_split", "fewshot_config", "calibration_split", "id_field", "output_type", "doc_to_text", "doc_to_target",
    "doc_to_choice", "target_delimiter", "fewshot_delimiter", "description", "num_fewshot",
    "generation_kwargs", "metadata", "sieve",
}


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
    fewshot_sampler: str = "default"
    calibration_split: str | None = None  # sieve's own key: calibrate on this split's examples, not the evaluated split's
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
        for key in ("dataset_name", "data_files", "split", "fewshot_split", "calibration_split", "id_field"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.fewshot_sampler != "default":  # absent = default, so existing task identities stay
            out["fewshot_config"] = {"sampler": self.fewshot_sampler}
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


# ---- reading the file safely --------------------------------------------------------------


class _BoundedLoader(yaml.SafeLoader):
    """A safe loader that measures the document's size with every alias expanded before
    building it: PyYAML shares aliased nodes, so a bomb parses in microseconds and only
    explodes later, when the data is walked (hashed, dumped) as a tree."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node)
        return self.construct_document(node)


def _check_expanded_size(root: yaml.Node) -> None:
    sizes: dict[int, int] = {}

    def size(node: yaml.Node, open_nodes: frozenset) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise TaskError("an alias refers to a node that contains it (a recursive alias)")
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [item for pair in node.value for item in pair] if isinstance(node, yaml.MappingNode) else []
        )
        total = 1 + sum(size(child, open_nodes | {id(node)}) for child in children)
        if total > MAX_YAML_NODES:
            raise TaskError(f"its aliases expand to more than {MAX_YAML_NODES:,} values (an alias bomb?)")
        sizes[id(node)] = total
        return total

    size(root, frozenset())


def read_task_yaml(path: Path) -> Any:
    """The parsed YAML of a task file, read with a size limit, strict UTF-8 and bounded aliases."""
    with open(path, "rb") as f:
        data = f.read(MAX_TASK_BYTES + 1)
    if len(data) > MAX_TASK_BYTES:
        raise TaskError(f"task file {path} is larger than {MAX_TASK_BYTES >> 20} MiB; a task file holds fields, not data")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TaskError(
            f"task file {path} is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}); save it as UTF-8"
        ) from None
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise TaskError(f"task file {path} is not valid YAML ({str(exc).splitlines()[0]}); fix its syntax") from None
    except TaskError as exc:
        raise TaskError(f"task file {path} is refused: {exc}; write the values out instead of aliasing them") from None
    except RecursionError:
        raise TaskError(f"task file {path} is nested too deeply to be a task file; fix its structure") from None


# ---- validating the fields ------------------------------------------------------------------


def load_task(path: str | os.PathLike, data_root: str | os.PathLike | None = None) -> Task:
    """Parse and validate a task file; errors name the field at fault."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"no such task file: {path}; pass a YAML task file with --task")
    raw = read_task_yaml(path)
    if not isinstance(raw, dict):
        raise TaskError(f"task file {path} must be a mapping of fields (dataset_path, output_type, ...)")
    return parse_task(raw, path.resolve(), data_root)


def parse_task(raw: dict, path: Path, data_root: str | os.PathLike | None = None) -> Task:
    where = f"task file {path}"
    unknown = sorted(set(map(str, raw)) - _KNOWN_FIELDS)
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
    until, max_gen = _generation(raw.get("generation_kwargs"), where)
    num_fewshot = raw.get("num_fewshot", 0) or 0
    if not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise TaskError(f"{where}: field 'num_fewshot' must be a whole number >= 0")
    sampler = _fewshot_sampler(raw.get("fewshot_config"), output_type, where)
    kwargs = raw.get("dataset_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise TaskError(f"{where}: field 'dataset_kwargs' must be a mapping")
    kwargs = dict(kwargs)
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
    fewshot_split = raw.get("fewshot_split")
    calibration_split = raw.get("calibration_split")
    _check_splits(data_files, split, where, fewshot_split=fewshot_split, calibration_split=calibration_split)
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
        fewshot_sampler=sampler,
        calibration_split=calibration_split,
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


def _generation(gen: Any, where: str) -> tuple[list[str], int]:
    gen = gen or {}
    if not isinstance(gen, dict):
        raise TaskError(f"{where}: field 'generation_kwargs' must be a mapping (until, max_gen_toks)")
    until = gen.get("until", ["\n\n"])
    until = [until] if isinstance(until, str) else until
    if not isinstance(until, list) or not all(isinstance(u, str) and u for u in until):
        raise TaskError(f"{where}: field 'generation_kwargs.until' must be a non-empty string or list of strings")
    max_gen = gen.get("max_gen_toks", 64)
    if not isinstance(max_gen, int) or max_gen < 1:
        raise TaskError(f"{where}: field 'generation_kwargs.max_gen_toks' must be a whole number >= 1")
    return until, max_gen


def _fewshot_sampler(config: Any, output_type: str, where: str) -> str:
    config = config or {}
    if not isinstance(config, dict) or set(config) - {"sampler"}:
        raise TaskError(f"{where}: field 'fewshot_config' must be a mapping with one key, sampler")
    sampler = config.get("sampler", "default")
    if sampler not in FEWSHOT_SAMPLERS:
        raise TaskError(f"{where}: field 'fewshot_config.sampler' is {sampler!r}; use one of {', '.join(FEWSHOT_SAMPLERS)}")
    if sampler == "balanced" and output_type != "multiple_choice":
        raise TaskError(f"{where}: field 'fewshot_config.sampler' balanced needs output_type multiple_choice (it balances classes)")
    return sampler


def _check_splits(data_files: Any, split: Any, where: str, **other_splits: Any) -> None:
    if other_splits.get("calibration_split") is not None and data_files is not None and not isinstance(data_files, dict):
        raise TaskError(f"{where}: field 'calibration_split' names a split, but 'data_files' is one set of files; "
                        f"make 'data_files' a mapping of split names to files")
    if not isinstance(data_files, dict):
        return
    if split is None:
        raise TaskError(f"{where}: field 'split' is missing; name which of {', '.join(data_files)} holds the examples")
    if split not in data_files:
        raise TaskError(f"{where}: field 'split' is {split!r} but 'data_files' has only {', '.join(data_files)}")
    for key, name in other_splits.items():
        if name is not None and name not in data_files:
            raise TaskError(f"{where}: field {key!r} is {name!r} but 'data_files' has only {', '.join(data_files)}")


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
