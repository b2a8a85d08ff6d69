"""Stage `task`: binding a task file to a workspace, and the bound task the other stages read.

`bind_task` copies the task into the workspace with every data path made absolute, splits
its examples by a seeded shuffle into disjoint calibration, search and test parts, draws the
few-shot demonstrations, and records ids, demonstrations and a fingerprint of the data in
`WS/task/split.json`, so capture, search and eval all read the same examples. Loading a
bound task re-checks the fingerprint: data changed since binding is an error, never a
silently different split.

Calibration comes from `calibration_split` (sieve's own key) when the task names one that holds
other data than the evaluated split: the model is then calibrated on the task's training inputs,
as many as capture's token budget wants, and the evaluated split's examples all go to search,
confirm and test. Records of that split equal to an evaluated record are left out of it.

Few-shot demonstrations never come from search or test: they come from `fewshot_split` when
that holds other data than the evaluated split, else from calibration. As in
lm-evaluation-harness, one spare demonstration is drawn and an example never demonstrates
itself (compared by content, so an exact duplicate of it is left out too).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import asdict
from functools import cached_property
from itertools import islice

import yaml

from ..errors import InputError, MissingStageError, TaskError
from ..files import sha256_json, write_json_atomic, write_text_atomic
from ..options import SplitOptions
from ..workspace import Stage, Workspace
from .data import LOCAL_BUILDERS, data_fingerprint, read_records, reads_same_data
from .render import Example, Renderer
from .spec import DEFAULT_TASK, Task, load_task
from .split import content_id, content_ids, make_split, record_ids

log = logging.getLogger(__name__)

STAGE = Stage.TASK
PARTS = ("calibration", "search", "confirm", "test")
SPLIT_SCHEMA = 2  # 2: content ids, few-shot sampler and source, data fingerprint
CALIBRATION = "calibration"
FROM_SPLIT = "split:"  # fewshot_from "split:NAME": demonstrations from dataset split NAME


class BoundTask:
    """A task bound to a workspace: its records, split, few-shot examples and rendered examples."""

    def __init__(
        self, task: Task, split: dict, records: dict[str, dict] | None = None,
        pools: dict[str, dict[str, dict]] | None = None,
    ) -> None:
        self.task = task
        self.split = split  # the contents of split.json
        self._records = records
        # records of other dataset splits by split name (few-shot, calibration): what bind_task already read
        self._pools: dict[str, dict[str, dict]] = dict(pools or {})
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
            self._records = records_by_id(self.task, read_records(self.task))
        return self._records

    def _pool(self, source: str | None) -> dict[str, dict]:
        """Records by id: the evaluated split's (source None), or dataset split `source`'s."""
        if source is None:
            return self.records
        if source not in self._pools:
            self._pools[source] = dict(fewshot_pool(self.task, source, self.records, []))
        return self._pools[source]

    def _records_of(self, part: str) -> dict[str, dict]:
        if part == CALIBRATION:
            return self._pool(fewshot_split_of(self.split.get("calibration_from", "")))
        return self.records

    @cached_property
    def _shots(self) -> list[tuple[str, dict]]:
        """The few-shot pool in draw order (num_fewshot + 1, so an example never demonstrates itself)."""
        ids = self.split.get("fewshot", [])
        source = fewshot_split_of(self.split.get("fewshot_from", CALIBRATION))
        pool = self._records_of(CALIBRATION) if source is None else self._pool(source)
        missing = [i for i in ids if i not in pool]
        if missing:
            raise _data_changed(self.task, f"few-shot example {missing[0]!r} is gone")
        return [(i, pool[i]) for i in ids]

    def ids(self, part: str) -> list[str]:
        if part not in PARTS:
            raise InputError(f"unknown split part {part!r}; use one of {', '.join(PARTS)}")
        return list(self.split["ids"].get(part, []))  # splits bound before the confirm part have none

    def examples(self, part: str) -> list[Example]:
        """The rendered examples of one part, in split order."""
        return list(self.iter_examples(part))

    def iter_examples(self, part: str) -> Iterator[Example]:
        """The examples of one part rendered one at a time, so a reader that stops early (capture at
        its token budget) does not render a whole training split."""
        records = self._records_of(part)
        missing = [i for i in self.ids(part) if i not in records]
        if missing:
            raise _data_changed(self.task, f"example {missing[0]!r} is gone")
        k = self.task.num_fewshot
        for id_ in self.ids(part):
            record = records[id_]
            shots = [rec for sid, rec in self._shots if sid != id_ and rec != record][:k]
            yield self._renderer.example(id_, record, shots)

    def fewshot_examples(self) -> list[Example]:
        """The few-shot pool's records (demonstrations and the spare), each rendered alone, without shots."""
        return [self._renderer.example(id_, record, []) for id_, record in self._shots]

    def texts(self, part: str, limit: int | None = None) -> list[str]:
        """Full text per example (context + delimiter + gold target): what capture reads; the first
        `limit` only (rendered as far as that) when given."""
        return [e.text(self.task.target_delimiter) for e in islice(self.iter_examples(part), limit)]


def records_by_id(task: Task, records: list[dict]) -> dict[str, dict]:
    return dict(zip(record_ids(task, records), records))


# ---- few-shot demonstrations --------------------------------------------------------------------


def fewshot_split_of(recorded: str) -> str | None:
    """The dataset split named by split.json's `fewshot_from`, None for the calibration part."""
    return recorded[len(FROM_SPLIT):] if recorded.startswith(FROM_SPLIT) else None


def calibration_source(task: Task) -> str | None:
    """The dataset split calibration comes from: `calibration_split` when it holds other data than
    the evaluated split, else None: a part of the evaluated split."""
    if task.calibration_split is None:
        return None
    if reads_same_data(task, task.split, task.calibration_split):
        log.warning("task %s: calibration_split %r reads the same data as the evaluated split; calibration is a part "
                    "of it instead", task.name, task.calibration_split)
        return None
    return task.calibration_split


def calibration_candidates(task: Task, source: str, pool: dict[str, dict], records: dict[str, dict]) -> list[str]:
    """Ids of split `source`'s records (`pool`), less those equal to an evaluated record (so no
    example the search or the test scores is ever calibrated on)."""
    evaluated = {content_id(r) for r in records.values()}
    ids = [i for i, r in pool.items() if content_id(r) not in evaluated]
    if not ids:
        raise TaskError(f"task {task.name}: calibration_split {source!r} holds no record that is not also an evaluated "
                        f"example; point it at training data, or drop it to calibrate on a part of {task.split!r}")
    return ids


def fewshot_source(task: Task) -> str | None:
    """The dataset split demonstrations come from: `fewshot_split` when it holds other data than
    the evaluated split, else None: the calibration part."""
    if task.num_fewshot == 0 or task.fewshot_split is None:
        return None
    if reads_same_data(task, task.split, task.fewshot_split):
        log.warning(
            "task %s: fewshot_split %r reads the same data as the evaluated split; "
            "demonstrations come from calibration instead, so no search or test example is shown",
            task.name, task.fewshot_split,
        )
        return None
    return task.fewshot_split


def fewshot_pool(task: Task, source: str | None, records: dict[str, dict], calibration: list[str]) -> list[tuple[str, dict]]:
    """Candidate demonstrations in data order: the calibration records (source None), or those of split `source`."""
    if source is None:
        chosen = set(calibration)
        return [(i, r) for i, r in records.items() if i in chosen]
    pool = read_records(task, source)
    return [(f"{source}:{i}", r) for i, r in zip(content_ids(pool), pool)]


def draw_fewshot(task: Task, pool: list[tuple[str, dict]], seed: int) -> list[str]:
    """Ids of num_fewshot + 1 demonstrations, drawn by the task's sampler (fewshot_config.sampler):
    `default` a seeded random draw, `first_n` the first in data order, `balanced` one per class in turn."""
    k = task.num_fewshot
    if k == 0:
        return []
    if len(pool) < k + 1:
        raise TaskError(f"task {task.name}: num_fewshot {k} needs at least {k + 1} examples to draw from, got {len(pool)}")
    rng = random.Random(f"fewshot-{seed}")
    if task.fewshot_sampler == "first_n":
        chosen = pool[: k + 1]
    elif task.fewshot_sampler == "balanced":
        chosen = _balanced(pool, k + 1, rng, Renderer(task))
    else:
        chosen = rng.sample(pool, k + 1)
    return [i for i, _ in chosen]


def _balanced(pool: list[tuple[str, dict]], n: int, rng: random.Random, renderer: Renderer) -> list[tuple[str, dict]]:
    """n demonstrations cycling through the gold classes in choice order, each class's in shuffled order."""
    shuffled = list(pool)
    rng.shuffle(shuffled)
    by_class: dict[int, list[tuple[str, dict]]] = {}
    for item in shuffled:
        by_class.setdefault(renderer.gold(item[1])[1], []).append(item)
    queues = [by_class[c][::-1] for c in sorted(by_class)]  # reversed: pop() takes the first
    chosen: list[tuple[str, dict]] = []
    while len(chosen) < n:
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop())
    return chosen


# ---- binding ------------------------------------------------------------------------------------


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
    records = records_by_id(task, read_records(task))
    fingerprint = data_fingerprint(task, list(records.values()))
    inputs = {"task": task.identity(), "split": asdict(options), "data": sha256_json(fingerprint)}
    _render_first(task, records)  # a broken template fails here, before the workspace records a binding
    if not ws.begin(STAGE, inputs, force):
        return _load_checked(ws, records)
    pools: dict[str, dict[str, dict]] = {}  # other dataset splits, each read once

    def pool_of(name: str) -> dict[str, dict]:
        if name not in pools:
            pools[name] = dict(fewshot_pool(task, name, records, []))
        return pools[name]

    calibration_from = calibration_source(task)
    external = (calibration_candidates(task, calibration_from, pool_of(calibration_from), records)
                if calibration_from else None)
    parts = make_split(list(records), options, external)
    source = fewshot_source(task) or calibration_from  # none named: demonstrations from calibration, wherever it is
    if not task.num_fewshot:
        pool = []
    else:
        pool = fewshot_pool(task, None, records, parts[CALIBRATION]) if source is None else list(pool_of(source).items())
    content = {
        "schema": SPLIT_SCHEMA,
        "task": task.name,
        "options": asdict(options),
        "counts": {p: len(v) for p, v in parts.items()},
        "ids": parts,
        "fewshot": draw_fewshot(task, pool, options.seed),
        "fewshot_sampler": task.fewshot_sampler,
        "fewshot_from": CALIBRATION if source is None else f"{FROM_SPLIT}{source}",
        "calibration_from": "" if calibration_from is None else f"{FROM_SPLIT}{calibration_from}",
        "data": fingerprint,
    }
    ws.task_yaml.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(ws.task_yaml, yaml.safe_dump(task.to_yaml_dict(), sort_keys=False, allow_unicode=True))
    write_json_atomic(ws.split_json, content)
    summary = {"task": task.name, "output_type": task.output_type, "source": task.source, "data_root": task.data_root, **content["counts"]}
    ws.finish(STAGE, inputs, [ws.task_yaml, ws.split_json], summary)
    log.info("bound task %s: %s", task.name, ", ".join(f"{p} {n}" for p, n in content["counts"].items()))
    return BoundTask(task, content, records, pools)


def _render_first(task: Task, records: dict[str, dict]) -> None:
    if not records:
        raise TaskError(f"task {task.name}: the data holds no records; check 'data_files' and 'split'")
    first_id, first = next(iter(records.items()))
    Renderer(task).example(first_id, first, [first] if task.num_fewshot else [])


def _recorded_split(ws: Workspace, task: Task) -> SplitOptions | None:
    """The split options already used for this same task in the workspace, so that a later
    `capture --task T` keeps the sizes an earlier `eval --task T --search-size ...` chose."""
    manifest = ws.read_manifest(STAGE)
    if not manifest or (manifest.get("inputs") or {}).get("task") != json.loads(json.dumps(task.identity(), default=str)):
        return None
    return SplitOptions(**manifest["inputs"]["split"])


def load_bound_task(ws: Workspace) -> BoundTask:
    """The task bound to the workspace, read from WS/task (its copy of the task file and split),
    after checking that its data is still what was bound."""
    return _load_checked(ws, None)


def _load_checked(ws: Workspace, records: dict[str, dict] | None) -> BoundTask:
    """`records`: the task's records by id when the caller has just read them."""
    ws.require(STAGE)
    task = load_task(ws.task_yaml)
    split = _read_split(ws, task)
    if records is None and task.dataset_path not in LOCAL_BUILDERS:  # no files to hash: hash the records
        records = records_by_id(task, read_records(task))
    recorded = split.get("data") or {}
    now = data_fingerprint(task, list(records.values()) if records is not None else None)
    if now != recorded:
        changed = sorted(k for k in set(now) | set(recorded) if now.get(k) != recorded.get(k))
        raise _data_changed(task, f"{changed[0]} differs")
    return BoundTask(task, split, records)


def _read_split(ws: Workspace, task: Task) -> dict:
    rebind = f"rebind with `--task {task.source} --force`"
    try:
        split = json.loads(ws.split_json.read_text())
    except (OSError, json.JSONDecodeError):
        raise TaskError(f"{ws.split_json} is missing or damaged; {rebind}") from None
    if not isinstance(split, dict) or split.get("schema") != SPLIT_SCHEMA:
        raise TaskError(f"{ws.split_json} was written by an older sieve (row-number ids, no data check); {rebind}")
    return split


def _data_changed(task: Task, what: str) -> TaskError:
    return TaskError(
        f"task {task.name}: the data changed since the task was bound ({what}); "
        f"rebind with `--task {task.source} --force` (later stages then redo their work)"
    )
