"""Example ids and the seeded calibration / search / test split (sizes: `options.SplitOptions`).

Ids are content-stable: the `id_field` value when the task names one, else a hash of the
record's content (with an occurrence number for exact duplicates), so inserting, deleting or
reordering other rows of the data file never changes which example an id names.
"""

from __future__ import annotations

import json
import random

from ..errors import TaskError
from ..files import sha256_bytes
from ..options import SplitOptions, part_count
from .spec import Task

ID_HEX_CHARS = 16  # 64 bits: collisions among a few million records are negligible, and harmless (see content_ids)


def make_split(ids: list[str], options: SplitOptions, calibration_ids: list[str] | None = None) -> dict[str, list[str]]:
    """Disjoint parts of `ids` by one seeded shuffle; the same ids and options give the same parts.

    `calibration_ids`: the task calibrates on another split (`calibration_split`): calibration is a
    seeded shuffle of those (all, or --calibration-size of them) and `ids` hold the other parts.
    """
    elsewhere = calibration_ids is not None
    sizes = options.sizes(len(ids), calibration_elsewhere=elsewhere)
    order = list(ids)
    random.Random(options.seed).shuffle(order)
    parts, start = {}, 0
    for name in ("test", "confirm", "search", "calibration"):  # the draw order: test first, so it never moves
        parts[name] = order[start : start + sizes[name]]
        start += sizes[name]
    if elsewhere:
        pool = list(calibration_ids)
        random.Random(f"calibration-{options.seed}").shuffle(pool)
        n = len(pool) if options.calibration is None else part_count(options.calibration, len(pool))
        if n < 1 or n > len(pool):
            raise TaskError(f"cannot draw {n} calibration examples from the {len(pool)} of the calibration split; "
                            f"use a --calibration-size between 1 and {len(pool)}")
        parts["calibration"] = pool[:n]
    return parts


def content_id(record: dict) -> str:
    """A short hash of the record's fields and values (key order does not matter)."""
    body = json.dumps(record, sort_keys=True, default=str, ensure_ascii=False)
    return sha256_bytes(body.encode("utf-8"))[:ID_HEX_CHARS]


def content_ids(records: list[dict]) -> list[str]:
    """Content ids, the n-th exact duplicate (n >= 2) suffixed `~n`, so every id is unique."""
    seen: dict[str, int] = {}
    ids = []
    for record in records:
        base = content_id(record)
        seen[base] = seen.get(base, 0) + 1
        ids.append(base if seen[base] == 1 else f"{base}~{seen[base]}")
    return ids


def record_ids(task: Task, records: list[dict]) -> list[str]:
    """Stable ids of records: the `id_field` value (which must be unique), else the content id."""
    if task.id_field is None:
        return content_ids(records)
    try:
        ids = [str(r[task.id_field]) for r in records]
    except KeyError:
        raise TaskError(f"task {task.name}: field 'id_field' names {task.id_field!r}, which some records lack") from None
    if len(set(ids)) != len(ids):
        raise TaskError(f"task {task.name}: field 'id_field' ({task.id_field!r}) is not unique; drop it to use content ids")
    return ids
