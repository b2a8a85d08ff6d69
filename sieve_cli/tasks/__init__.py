"""Tasks: the task file, its data, rendering, the calibration/search/test split, and stage `task`.

- `spec`: the YAML task file (read safely) and the validated `Task`.
- `data`: reading records (local files through `datasets`' builders, a hub dataset, a built-in generator).
- `render`: Jinja templates (sandboxed) -> `Example` (context, target, choices, gold).
- `split`: content-stable example ids, `SplitOptions`, `make_split`.
- `binding`: `bind_task` / `load_bound_task` -> `BoundTask`, few-shot draws, `WS/task/split.json`.
"""

from .binding import PARTS, STAGE, BoundTask, bind_task, draw_fewshot, fewshot_pool, fewshot_source, load_bound_task
from .data import GENERATED, LOCAL_BUILDERS, data_fingerprint, read_records, stdlib_records
from .render import Example, Renderer
from .spec import (
    BUILTIN_TASKS,
    DATA_ROOT_ENV,
    DEFAULT_TASK,
    FEWSHOT_SAMPLERS,
    OUTPUT_TYPES,
    STDLIB_TASK,
    Task,
    find_data_root,
    load_task,
    parse_task,
)
from .split import SplitOptions, content_ids, make_split, record_ids  # SplitOptions lives in options.py

__all__ = [
    "BUILTIN_TASKS", "DATA_ROOT_ENV", "DEFAULT_TASK", "FEWSHOT_SAMPLERS", "GENERATED", "LOCAL_BUILDERS", "OUTPUT_TYPES", "PARTS", "STAGE", "STDLIB_TASK",
    "BoundTask", "Example", "Renderer", "SplitOptions", "Task",
    "bind_task", "content_ids", "data_fingerprint", "draw_fewshot", "fewshot_pool", "fewshot_source",
    "find_data_root", "load_bound_task", "load_task", "make_split", "parse_task", "read_records",
    "record_ids", "stdlib_records",
]
