"""A pool of Ray actors that score search candidates in parallel (`sieve search --workers N`).

Each actor runs `setup(*args)` once (the search loads the workspace model, the tokenised split
parts and the factors there) and then scores one candidate at a time with what it built.
`WorkerPool.map` hands a batch to whichever actor is free and returns the results in the
batch's order, so a search on the pool writes the same history as one in this process. An
actor that dies mid-batch is replaced (the new one runs `setup` again) and its candidate
scored again. Ray is imported only when a pool starts: the serial search never loads it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from .errors import InputError, SieveError, WorkerError

log = logging.getLogger(__name__)

# Fault injection for the tests: a marker file's path. Worker 1 (the second) creates the file on
# its first candidate and exits on the spot, as a worker killed by the OS (out of memory) would;
# the file stops its replacement from doing it again. Single evaluations always go to worker 0,
# so in a search that candidate belongs to a GA generation.
EXIT_ONCE_ENV = "SIEVE_WORKER_EXIT_ONCE"
EXIT_SLOT = 1
ATTEMPTS = 3  # a candidate that kills this many workers is not the workers' bad luck: stop
LOCAL_OBJECT_STORE = 128 * 2**20  # only rank maps and scores travel between processes
CONNECT_TIMEOUT_S = 5.0
INSTALL = "pip install 'sieve-cli[distributed]'"


class Worker:
    """One actor: holds what `setup` built (job name -> function) and runs one item at a time."""

    def __init__(self, setup: Callable[..., dict[str, Callable]], args: tuple, threads: int, slot: int) -> None:
        import torch

        self.slot = slot
        torch.set_num_threads(threads)  # the CPUs Ray reserved for this actor, no more
        self.jobs: dict[str, Callable] = {}
        self.failure: SieveError | None = None
        try:
            self.jobs = setup(*args)
        except SieveError as exc:  # kept for `names()`, which re-raises it as a task error the driver unwraps
            self.failure = exc

    def names(self) -> list[str]:
        if self.failure is not None:
            raise self.failure
        return sorted(self.jobs)

    def run(self, job: str, item: Any) -> Any:
        exit_once_if_asked(self.slot)
        return self.jobs[job](item)


def exit_once_if_asked(slot: int) -> None:
    marker = os.environ.get(EXIT_ONCE_ENV)
    if not marker or slot != EXIT_SLOT:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return  # a worker already died for the test
    os._exit(1)


class WorkerPool:
    """`count` Ray actors built by one `setup`; `map(job, items)` scores a batch on them, in order."""

    def __init__(self, ray: Any, make_actor: Callable[[int], Any], count: int, owns_ray: bool) -> None:
        self.ray, self.make_actor, self.owns_ray = ray, make_actor, owns_ray
        self.actors = [make_actor(slot) for slot in range(count)]
        self.replaced = 0  # actors started again after one died
        self.jobs: list[str] = []  # the job names `setup` gave (the same in every actor)

    @classmethod
    def start(cls, setup: Callable[..., dict[str, Callable]], args: tuple, workers: int, threads: int = 1,
              address: str | None = None) -> "WorkerPool":
        """Connect to Ray (or start it locally), start the actors and wait until each has run `setup`."""
        started = time.perf_counter()
        ray = import_ray(workers)
        owns_ray = connect(ray, address, workers * threads)
        try:
            check_cpus(ray, address, workers, threads)
            env = {EXIT_ONCE_ENV: os.environ[EXIT_ONCE_ENV]} if os.environ.get(EXIT_ONCE_ENV) else None
            remote = ray.remote(Worker).options(num_cpus=threads, **({"runtime_env": {"env_vars": env}} if env else {}))
            pool = cls(ray, lambda slot: remote.remote(setup, args, threads, slot), workers, owns_ray)
        except BaseException:
            if owns_ray:
                ray.shutdown()
            raise
        try:
            pool.jobs = pool.unwrapped(lambda: ray.get([a.names.remote() for a in pool.actors]))[0]
        except ray.exceptions.RayActorError as exc:  # killed while loading (out of memory?)
            pool.close()
            raise WorkerError(f"a search worker died while loading the workspace ({first_line(exc)}); its log is in "
                              f"Ray's session folder (/tmp/ray/session_latest/logs on its node); use fewer "
                              f"--workers per machine, or --workers 1") from None
        except BaseException:
            pool.close()
            raise
        log.info("%d search workers ready (%d thread%s each) in %.0f s", workers, threads, "" if threads == 1 else "s",
                 time.perf_counter() - started)
        return pool

    def map(self, job: str, items: list) -> list:
        """`job(item)` for each item on the free actors; results in the items' order.

        An actor that dies is replaced and its item given to the next free actor; an error the
        job raises (a `SieveError` stays one) stops the batch.
        """
        ray = self.ray
        results: list = [None] * len(items)
        todo, idle = deque(range(len(items))), deque(range(len(self.actors)))
        attempts = [0] * len(items)
        running: dict = {}  # object ref -> (item index, actor slot)
        while todo or running:
            while todo and idle:
                i, slot = todo.popleft(), idle.popleft()
                running[self.actors[slot].run.remote(job, items[i])] = (i, slot)
            [done], _ = ray.wait(list(running), num_returns=1)
            i, slot = running.pop(done)
            try:
                results[i] = self.unwrapped(lambda: ray.get(done))
            except ray.exceptions.RayActorError as exc:
                attempts[i] += 1
                if attempts[i] >= ATTEMPTS:
                    raise WorkerError(f"candidate {i + 1} of {len(items)} killed {ATTEMPTS} search workers in a row "
                                      f"(out of memory?): use fewer --workers per machine, or --workers 1") from exc
                log.warning("search worker %d died while scoring candidate %d of %d; starting a new worker and "
                            "scoring that candidate again", slot, i + 1, len(items))
                self.replace(slot)
                todo.appendleft(i)
            idle.append(slot)
        return results

    def unwrapped(self, call: Callable[[], Any]) -> Any:
        """`call()`, with a `SieveError` raised in an actor raised here as itself (one line in the CLI)."""
        try:
            return call()
        except self.ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, SieveError):
                raise exc.cause from None
            raise

    def replace(self, slot: int) -> None:
        try:
            self.ray.kill(self.actors[slot], no_restart=True)
        except Exception:  # already gone: nothing to stop
            pass
        self.actors[slot] = self.make_actor(slot)
        self.replaced += 1

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.actors = []
        if self.owns_ray:
            self.ray.shutdown()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def import_ray(workers: int) -> Any:
    try:
        import ray
    except ImportError:
        raise InputError(f"--workers {workers} needs Ray, which is not installed: {INSTALL} (or --workers 1)") from None
    return ray


def connect(ray: Any, address: str | None, cpus: int) -> bool:
    """Join the cluster at `address`, else start Ray on this machine with `cpus` CPUs.

    Returns whether this call connected (so `close` disconnects, and stops a local Ray). A Ray
    session the caller already started (a notebook, the tests) is used as it is.
    """
    if address:
        check_reachable(address)
    if ray.is_initialized():
        return False
    quiet = dict(log_to_driver=False, logging_level=logging.WARNING)  # the workers' output stays in Ray's logs
    if not address:
        ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE, **quiet)
        return True
    try:
        ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise InputError(unreachable(address, first_line(exc))) from None
    return True


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_reachable(address: str) -> None:
    """Refuse an address nothing listens on, in seconds (Ray itself retries for minutes)."""
    if address in ("auto", "local"):
        return
    where = urlsplit(address if "://" in address else f"//{address}")
    try:
        host, port = where.hostname, where.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise InputError(f"--ray-address {address!r} is not host:port; give the head node's address such as "
                         f"10.0.0.5:6379 (or ray://10.0.0.5:10001), or leave it out to start Ray on this machine")
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise InputError(unreachable(address, exc.strerror or type(exc).__name__)) from None


def unreachable(address: str, reason: str) -> str:
    return (f"cannot reach a Ray cluster at --ray-address {address} ({reason}): start one there with "
            f"`ray start --head`, correct the address, or leave --ray-address out to start Ray on this machine")


def check_cpus(ray: Any, address: str | None, workers: int, threads: int) -> None:
    """Workers that ask for more CPUs than the cluster has would wait forever: refuse them now."""
    have = int(ray.cluster_resources().get("CPU", 0))
    if have < workers * threads:
        where = f"the Ray cluster at {address}" if address else "this Ray session"
        raise InputError(f"--workers {workers} x --worker-threads {threads} needs {workers * threads} CPUs but "
                         f"{where} has {have}: lower --workers or --worker-threads")
