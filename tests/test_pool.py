"""`sieve search --workers N` on a real local Ray (2 one-CPU actors) and a tiny random model workspace:
the same plan and history as the serial search, a dead worker replaced, a bad address in one line.

The tests that start workers are marked slow: each worker process imports torch and transformers
and loads the model (5-25 s a worker on the shared 2-core machine); one Ray session serves them all.
"""

import json
import os
import socket
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from sieve_cli import pool as pool_module
from sieve_cli.capture import CaptureOptions, run_capture
from sieve_cli.cli import app
from sieve_cli.discover import DiscoverOptions, run_discover
from sieve_cli.errors import InputError, SieveError, WorkerError
from sieve_cli.fit import FitOptions, run_fit
from sieve_cli.options import GAConfig, SearchOptions, SplitOptions
from sieve_cli.pool import WorkerPool
from sieve_cli.search import run_search, worker_jobs
from sieve_cli.tasks import bind_task
from sieve_cli.workspace import Workspace

from .test_search import fake_fit
from .test_tasks import write_task
from .tiny import tiny_model

ray = pytest.importorskip("ray")

OPTIONS = SearchOptions(method="output", strategy="genetic", grid_step=0.1, tolerance=0.2, allow_chance=True,
                        ga=GAConfig(population=6, generations=2, patience=2, seed=1))


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module (starting one takes seconds): 2 CPUs, so 2 one-CPU workers."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=pool_module.LOCAL_OBJECT_STORE)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_dir) -> Workspace:
    """A tiny model with a text-modelling task, captured and fitted (the real evaluator scores it)."""
    folder = tmp_path_factory.mktemp("pool")
    ws = Workspace(folder / "ws")
    run_discover(ws, DiscoverOptions(model=str(tiny_dir)))
    bind_task(ws, write_task(folder, "text_modelling"), split=SplitOptions(search=8, confirm=6, test=6))
    run_capture(ws, CaptureOptions(tokens=1000, seq_len=64))
    run_fit(ws, FitOptions(method="output"))
    return ws


def history(ws: Workspace) -> list[dict]:
    return [json.loads(line) for line in ws.history_jsonl.read_text().splitlines()]


def without_time(plan: dict) -> dict:
    return {**plan, "search": {k: v for k, v in plan["search"].items() if k != "seconds"}}


@pytest.fixture(scope="module")
def serial(workspace, ray_session):
    """The one-process search (no Ray involved) that the pooled ones must reproduce."""
    plan = run_search(workspace, OPTIONS, force=True)
    return without_time(plan), history(workspace)


def pooled_search(ws: Workspace, monkeypatch, options: SearchOptions = OPTIONS) -> tuple[dict, list[dict], list[int]]:
    batches = []
    original = WorkerPool.map

    def recorded_map(self, job, items):
        batches.append(len(items))
        return original(self, job, items)

    monkeypatch.setattr(WorkerPool, "map", recorded_map)
    plan = run_search(ws, replace(options, workers=2), force=True)
    return without_time(plan), history(ws), batches


@pytest.mark.slow
def test_two_workers_give_the_serial_plan_and_history(workspace, serial, monkeypatch):
    plan, pooled_history, batches = pooled_search(workspace, monkeypatch)
    assert plan == serial[0]
    assert pooled_history == serial[1]
    assert plan["search"]["generations"] >= 1 and max(batches) > 1  # generations really went to both workers


@pytest.mark.slow
def test_the_local_search_on_two_workers_gives_the_serial_plan_and_history(workspace, ray_session, monkeypatch):
    local = replace(OPTIONS, strategy="local")
    serial_plan = without_time(run_search(workspace, local, force=True))
    serial_history = history(workspace)
    plan, pooled_history, batches = pooled_search(workspace, monkeypatch, local)
    assert plan == serial_plan and pooled_history == serial_history
    assert max(batches) > 1


@pytest.mark.slow
def test_a_worker_that_dies_mid_generation_is_replaced_and_nothing_is_lost(workspace, serial, monkeypatch,
                                                                           tmp_path, caplog):
    marker = tmp_path / "died"
    monkeypatch.setenv(pool_module.EXIT_ONCE_ENV, str(marker))
    plan, pooled_history, _ = pooled_search(workspace, monkeypatch)
    assert marker.exists()  # worker 1 really exited, on its first candidate: one in a GA generation's batch
    assert "died while scoring candidate" in caplog.text
    assert plan == serial[0] and pooled_history == serial[1]


@pytest.mark.slow
def test_an_error_in_a_worker_setup_is_one_line(ray_session, tmp_path):
    gone = Workspace(tmp_path / "empty")  # no discover stage: each worker's setup fails
    with pytest.raises(SieveError) as caught:
        WorkerPool.start(worker_jobs, (str(gone.root), OPTIONS), workers=1)
    assert "run `sieve fit" in str(caught.value) and "Traceback" not in str(caught.value)


@pytest.mark.slow
def test_a_worker_killed_while_loading_is_one_line(ray_session):
    with pytest.raises(WorkerError, match="died while loading the workspace"):
        WorkerPool.start(exits_while_loading, (), workers=1)


def exits_while_loading() -> dict:
    os._exit(1)  # what the OS's out-of-memory killer does to a worker loading a model too large for it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_ray_address_is_one_line(tmp_path, tiny_dir):
    ws = Workspace(tmp_path / "ws")  # discover and a fit are all search reads before it starts its workers
    run_discover(ws, DiscoverOptions(model=str(tiny_dir)))
    ws.begin("task", {"task": "synthetic"})
    ws.finish("task", {"task": "synthetic"}, [])
    fake_fit(ws, tiny_model("llama"))
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    result = CliRunner().invoke(app, ["search", "-w", str(ws.root), "--method", "output", "--workers", "2", "--ray-address", address])
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = " ".join(result.output.split())
    assert f"cannot reach a Ray cluster at --ray-address {address}" in line and "ray start --head" in line


@pytest.mark.parametrize("options, flag", [
    (dict(workers=0), "--workers"),
    (dict(worker_threads=0), "--worker-threads"),
    (dict(ray_address="10.0.0.5:6379"), "--ray-address"),
])
def test_bad_pool_options_name_the_flag(options, flag):
    with pytest.raises(InputError, match=flag):
        SearchOptions(**options)


def test_a_malformed_address_is_one_line():
    with pytest.raises(InputError, match="not host:port"):
        pool_module.check_reachable("head-node")


def test_pool_options_do_not_make_the_plan_stale():
    assert SearchOptions(method="output", workers=4, worker_threads=2, ray_address="h:1").recorded() == SearchOptions(method="output").recorded()
