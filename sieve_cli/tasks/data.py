"""Reading a task's records: local data files, a Hugging Face dataset, or a built-in generator (`GENERATED`).

Local files (`dataset_path: csv | json | text | parquet`) are read by `datasets`' own packaged
builders, so the `dataset_kwargs` users know from lm-evaluation-harness task files work
(`column_names`, `delimiter`, `quoting`, `encoding`, `field`, ...). Each read is offline
(local files only) and leaves nothing behind: the builder prepares its Arrow file in a
temporary folder that is deleted once the records are in memory.

Sieve additions: a JSON file holding one object keyed by id (`{"123": {...}, ...}`) gives
one record per key, the key as field `id`; a blank line of a `text` file is not a record.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import re
import sysconfig
import tempfile
from pathlib import Path
from typing import Any, Iterator

from ..builtin_tasks.reviews import review_records
from ..errors import TaskError
from ..files import disk_full, sha256_file, sha256_json
from .spec import DATA_ROOT_ENV, Task

LOCAL_BUILDERS = ("json", "csv", "text", "parquet")
STDLIB = "python_stdlib"


def read_records(task: Task, split: str | None = None) -> list[dict]:
    """The records of one dataset split (`task.split` by default), each a dict of fields."""
    split = split or task.split
    if task.dataset_path in GENERATED:
        return GENERATED[task.dataset_path](**task.dataset_kwargs)
    if task.dataset_path in LOCAL_BUILDERS:
        records = []
        for path in data_files_of(task, split):
            records.extend(read_local_file(task, path))
        return records
    return _read_hub(task, split)


def data_files_of(task: Task, split: str | None) -> list[Path]:
    """The existing local files of one split, glob patterns expanded, in the order given."""
    files = task.data_files[split] if isinstance(task.data_files, dict) else task.data_files
    if not files:
        raise TaskError(f"task {task.name}: field 'data_files' is missing; local builder {task.dataset_path!r} needs files")
    paths = []
    for entry in [files] if isinstance(files, str) else files:
        if glob.has_magic(entry):
            matches = sorted(glob.glob(entry))
            if not matches:
                raise TaskError(f"task {task.name}: data_files pattern {entry} matches no file; check 'data_files'")
            paths.extend(Path(m) for m in matches)
            continue
        path = Path(entry)
        if path.is_dir():
            raise TaskError(
                f"task {task.name}: data file {path} is a folder; point 'data_files' at the files in it "
                f"(e.g. {path}/*.{_suffix(task)})"
            )
        if not path.is_file():
            raise TaskError(f"task {task.name}: data file {path} does not exist; check 'data_files' or the data root (${DATA_ROOT_ENV})")
        paths.append(path)
    return paths


def reads_same_data(task: Task, split_a: str | None, split_b: str | None) -> bool:
    """Whether two split names read the same records (one file for every split, or the same split)."""
    if (split_a or task.split) == (split_b or task.split):
        return True
    if task.dataset_path in LOCAL_BUILDERS:
        return data_files_of(task, split_a) == data_files_of(task, split_b)
    return task.dataset_path in GENERATED


def data_fingerprint(task: Task, records: list[dict] | None = None) -> dict[str, str]:
    """What the bound examples were read from: sha256 of each local file they come from (the
    evaluated split, the few-shot split and the calibration split), else of the records themselves."""
    if task.dataset_path in LOCAL_BUILDERS:
        splits = dict.fromkeys([task.split, task.fewshot_split or task.split, task.calibration_split or task.split])
        paths = dict.fromkeys(p for s in splits for p in data_files_of(task, s))
        return {str(p): sha256_file(p) for p in paths}
    return {"records": sha256_json(records if records is not None else read_records(task))}


def _suffix(task: Task) -> str:
    return {"text": "txt", "json": "jsonl"}.get(task.dataset_path, task.dataset_path)


# ---- local files through datasets' builders -------------------------------------------------


def read_local_file(task: Task, path: Path) -> list[dict]:
    """The records of one local file, read by the `datasets` builder named by `dataset_path`."""
    if is_blank(path, binary=task.dataset_path == "parquet"):  # builders word it StopIteration, SchemaInferenceError...
        raise TaskError(f"task {task.name}: data file {path} is empty; put the task's records in it or point "
                        f"'data_files' at the file that holds them")
    if task.dataset_path == "json":
        keyed = _id_keyed_json(path, task.dataset_kwargs.get("encoding") or "utf-8")
        if keyed is not None:
            return keyed
    records = _load_with_builder(task, path)
    if task.dataset_path == "text":
        records = [r for r in records if str(r.get("text", "")).strip()]
    return records


def is_blank(path: Path, binary: bool = False, chunk: int = 1 << 16) -> bool:
    """Whether the file holds nothing (a binary format), or only whitespace (a text one); reads up to the
    first byte that is not, so a file with records costs one small read."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if binary or block.strip():
                return False
    return True


def _load_with_builder(task: Task, path: Path) -> list[dict]:
    import datasets
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    bars_were_off = are_progress_bars_disabled()
    disable_progress_bars()  # library code stays quiet; the CLI draws its own bars
    try:
        with _parser_errors_unlogged(), tempfile.TemporaryDirectory(prefix="sieve-datasets-") as cache:
            data = datasets.load_dataset(
                task.dataset_path,
                data_files=[str(path)],
                split="train",  # a packaged builder puts bare data_files in split "train"
                cache_dir=cache,
                keep_in_memory=True,
                download_config=datasets.DownloadConfig(local_files_only=True, cache_dir=cache),
                **task.dataset_kwargs,
            )
            return data.to_list()
    except Exception as exc:  # datasets wraps parser errors in its own types; the cause says what happened
        raise _read_error(task, path, exc) from None
    finally:
        if not bars_were_off:
            enable_progress_bars()


@contextlib.contextmanager
def _parser_errors_unlogged() -> Iterator[None]:
    """datasets logs a parser's error ("Failed to read file ...") before it raises it: the raised one becomes
    sieve's one line, so the logged copy is dropped (shown where datasets' info is, as with --debug)."""
    logger = logging.getLogger("datasets")
    level = logger.level
    if not logger.isEnabledFor(logging.INFO):
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _read_error(task: Task, path: Path, exc: BaseException) -> TaskError:
    cause = _root_cause(exc)
    if disk_full(exc):  # datasets prepares the records as an Arrow file in a temporary folder first
        return TaskError(
            f"task {task.name}: the temporary folder {tempfile.gettempdir()} is full or limits file size, so datasets "
            f"could not prepare {path} there ({_first_line(cause)}); free space there, or set TMPDIR to a folder with "
            f"room, and rerun"
        )
    if isinstance(cause, UnicodeDecodeError):
        encoding = task.dataset_kwargs.get("encoding") or "utf-8"
        return TaskError(
            f"task {task.name}: data file {path} is not {encoding} text ({undecodable_at(path, encoding) or cause.reason}); "
            f"set dataset_kwargs.encoding (e.g. latin-1) or save the file as UTF-8"
        )
    if NO_RECORDS.search(str(exc)):
        return TaskError(f"task {task.name}: data file {path} holds no records (only a header, or an empty list?); "
                         f"put the task's records in it or point 'data_files' at the file that holds them")
    unknown = re.search(r"doesn't have a '([^']+)' key", str(exc))
    if unknown:
        return TaskError(
            f"task {task.name}: dataset_kwargs has {unknown.group(1)!r}, which the datasets {task.dataset_path} "
            f"builder does not take; see its options (e.g. column_names, delimiter, encoding)"
        )
    return TaskError(
        f"task {task.name}: could not read data file {path} as {task.dataset_path} ({type(cause).__name__}: "
        f"{_first_line(cause)}); check the file and 'dataset_kwargs'"
    )


# what datasets says of a file whose builder found no row (a CSV header alone, a JSON `[]`)
NO_RECORDS = re.compile(r"corresponds to no data|at least one example")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def undecodable_at(path: Path, encoding: str) -> str:
    """What the first byte that is not `encoding` text is and where ("invalid start byte at line 201, byte 6"),
    found line by line (the builder's offset counts from the block it was decoding); "" where lines are not
    split at a b"\\n"."""
    try:
        if "\n".encode(encoding) != b"\n":  # UTF-16, UTF-32: a line end is more than that byte
            return ""
    except LookupError:
        return ""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode(encoding)
            except UnicodeDecodeError as exc:
                return f"{exc.reason} at line {number}, byte {exc.start + 1}"
    return ""


def _root_cause(exc: BaseException) -> BaseException:
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, UnicodeDecodeError):
            return exc
        nxt = exc.__cause__ or exc.__context__
        if nxt is None:
            return exc
        exc = nxt
    return exc


def _id_keyed_json(path: Path, encoding: str) -> list[dict] | None:
    """Records of a JSON file holding one object keyed by id whose values are objects, else None.

    Cheap for JSON Lines: `json.loads` stops at the end of the first line ("Extra data")."""
    with open(path, "rb") as f:
        if f.read(64).lstrip()[:1] != b"{":
            return None
    try:
        whole = json.loads(path.read_text(encoding=encoding))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # JSON Lines, or an error the builder reports with its own message
    if isinstance(whole, dict) and whole and all(isinstance(v, dict) for v in whole.values()):
        return [{"id": key, **value} for key, value in whole.items()]
    return None


# ---- other sources ------------------------------------------------------------------------------


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


def stdlib_records(max_chars: int = 1200, min_chars: int = 200) -> list[dict[str, Any]]:
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



# Datasets built in code rather than read from files: dataset_path -> records function,
# called with the task's dataset_kwargs.
GENERATED = {STDLIB: stdlib_records, "synthetic_reviews": review_records}