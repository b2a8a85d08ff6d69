"""Task load time before/after reading local data through `datasets`' builders, side by side.

"before" is sieve_cli/tasks.py as of commit BEFORE (hand-written csv/json/text readers), loaded
from git history into this process; "after" is the current `sieve_cli.tasks` package. Both read
the same task file on the same data, alternating, in one process run:
- records: `read_records` of the evaluated split and the few-shot split (warm: median of --repeats);
- bind: `bind_task` into a fresh workspace, then render every test example (warm, median);
- cold: the first `read_records` in a fresh Python process, imports included (median of --cold);
- in stage: the same after `import torch, transformers` (untimed), as in a capture/eval/search process.

    PYTHONPATH=$PWD python bench/task_load.py [--task examples/tasks/sst2.yaml] [--data-root /work/shared/data]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEFORE = "31cc1a0"  # the last commit with the single-module tasks.py


def load_before():
    """The old tasks module, imported from git history as sieve_cli._tasks_before."""
    source = subprocess.run(["git", "show", f"{BEFORE}:sieve_cli/tasks.py"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_loader("sieve_cli._tasks_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "sieve_cli"
    module.__file__ = str(REPO / "sieve_cli" / "tasks.py")  # where DEFAULT_TASK is looked up from
    sys.modules[spec.name] = module
    exec(compile(source, f"{BEFORE}:sieve_cli/tasks.py", "exec"), module.__dict__)
    return module


def read_both_splits(tasks, task_path: str, data_root: str) -> int:
    task = tasks.load_task(task_path, data_root)
    n = len(tasks.read_records(task))
    if task.fewshot_split:
        n += len(tasks.read_records(task, task.fewshot_split))
    return n


def bind_and_render(tasks, task_path: str, data_root: str) -> int:
    from sieve_cli.workspace import Workspace

    with tempfile.TemporaryDirectory() as ws:
        return len(tasks.bind_task(Workspace(ws), task_path, data_root=data_root).examples("test"))


COLD = """
import sys, time
if {preimport}:
    import torch, transformers  # noqa: F401 - what every stage that binds a task has loaded already
start = time.perf_counter()
sys.path.insert(0, {repo!r}); sys.path.insert(0, {bench!r})
import task_load
tasks = task_load.load_before() if {which!r} == "before" else __import__("sieve_cli.tasks", fromlist=["x"])
task_load.read_both_splits(tasks, {task!r}, {root!r})
print(time.perf_counter() - start)
"""


def cold_seconds(which: str, task: str, root: str, preimport: bool) -> float:
    code = COLD.format(repo=str(REPO), bench=str(REPO / "bench"), which=which, task=task, root=root, preimport=preimport)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default=str(REPO / "examples" / "tasks" / "sst2.yaml"))
    parser.add_argument("--data-root", default="/work/shared/data")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cold", type=int, default=3)
    args = parser.parse_args()
    import sieve_cli.tasks as after

    before = load_before()
    sides = {"before": before, "after": after}
    for tasks in sides.values():  # warm-up: imports, page cache
        read_both_splits(tasks, args.task, args.data_root)
    results: dict[str, dict[str, list[float]]] = {name: {"records": [], "bind": [], "cold": [], "in_stage": []} for name in sides}
    counts = {}
    for _ in range(args.repeats):
        for name, tasks in sides.items():
            seconds, counts[name] = timed(read_both_splits, tasks, args.task, args.data_root)
            results[name]["records"].append(seconds)
            results[name]["bind"].append(timed(bind_and_render, tasks, args.task, args.data_root)[0])
    for _ in range(args.cold):
        for name in sides:
            results[name]["cold"].append(cold_seconds(name, args.task, args.data_root, preimport=False))
            results[name]["in_stage"].append(cold_seconds(name, args.task, args.data_root, preimport=True))
    summary = {name: {k: round(statistics.median(v), 4) for k, v in r.items()} | {"rows": counts[name]}
               for name, r in results.items()}
    print(json.dumps({"task": Path(args.task).name, **summary}, indent=1))
    print(f"{'':8} {'records (warm)':>15} {'bind+render':>12} {'cold (fresh process)':>21} {'cold in stage':>14}")
    for name, s in summary.items():
        print(f"{name:8} {s['records']:14.3f}s {s['bind']:11.3f}s {s['cold']:20.2f}s {s['in_stage']:13.2f}s"
              f"   ({s['rows']} rows)")


if __name__ == "__main__":
    main()
