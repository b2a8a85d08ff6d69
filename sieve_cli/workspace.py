"""The workspace: one folder per pruning job, one sub-folder and manifest per stage.

`Workspace` owns every path. Stages talk to each other only through these files, and
each stage's `manifest.json` records what it was made from (options, model, task,
upstream manifests), so a rerun can tell "up to date" from "stale" from "resume".
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError, MissingStageError, StaleStageError, WorkspaceError
from .files import check_inside, open_no_follow, read_json, sha256_file, sha256_json, write_json_atomic
from .options import STRATEGIES
from .version import __version__

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
CHECKED_BYTES = 16 << 20  # files up to this size are re-hashed whenever a later stage requires their stage


class Stage:
    """The stage keys: each is a folder under WS/ holding the stage's files and manifest.json."""

    DISCOVER = "discover"
    TASK = "task"
    CAPTURE = "capture"
    SEARCH = "search"
    HEAL = "heal"
    APPLY = "apply"
    REPORT = "report"

    @staticmethod
    def apply(healed: bool = False) -> str:
        """`apply --healed` is its own stage (`apply/healed`), so the plain and the healed model coexist."""
        return "apply/healed" if healed else "apply"

    @staticmethod
    def fit(method: str) -> str:
        """Each fit method is its own stage (`fit/<method>`) so methods coexist."""
        return f"fit/{method}"

    @staticmethod
    def eval(label: str) -> str:
        """Each evaluation (model, split part, limit) is its own stage: `eval/<label>`."""
        return f"eval/{label}"


# What to run to produce each stage, for "missing upstream" messages.
STAGE_COMMANDS = {
    Stage.DISCOVER: "sieve discover MODEL -w {ws}",
    Stage.TASK: "sieve capture -w {ws} --task TASK.yaml",
    Stage.CAPTURE: "sieve capture -w {ws} --task TASK.yaml",
    "fit": "sieve fit -w {ws}",
    Stage.SEARCH: "sieve search -w {ws}",
    Stage.HEAL: "sieve heal -w {ws}",
    Stage.APPLY: "sieve apply -w {ws} -o OUT",
    "eval": "sieve eval -w {ws}",
}


class Workspace:
    """Every path of a workspace, and the manifest protocol that stages follow."""

    def __init__(self, root: str | os.PathLike, replace_stale: bool = False) -> None:
        """`replace_stale`: stages re-run where their inputs changed instead of refusing
        (what `sieve run` does, like `make`); single stages refuse unless --force."""
        self.root = Path(root).expanduser().resolve()
        self.replace_stale = replace_stale
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"workspace {self.root} is a file, not a folder; pass a folder with -w")

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    # ---- paths -------------------------------------------------------------------
    def inside(self, path: Path) -> Path:
        """`path`, after checking that it (and any link on the way) stays inside the workspace.

        Stage names come from files too (a plan's method): `fit/../../x` or a folder linked
        elsewhere must never make a stage read or write outside the workspace. A received workspace
        may hold planted links: any link on the way is refused, so every path a stage builds from
        `inside` can be written and deleted (through `files.atomic_path`, `remove_path`, `make_dir`).
        """
        return check_inside(self.root, path, "workspace")

    def stage_dir(self, stage: str) -> Path:
        return self.inside(self.root / stage)

    def manifest_path(self, stage: str) -> Path:
        return self.inside(self.stage_dir(stage) / MANIFEST)

    @property
    def matrices_json(self) -> Path:
        return self.inside(self.stage_dir(Stage.DISCOVER) / "matrices.json")

    @property
    def task_yaml(self) -> Path:
        return self.inside(self.stage_dir(Stage.TASK) / "task.yaml")

    @property
    def split_json(self) -> Path:
        return self.inside(self.stage_dir(Stage.TASK) / "split.json")

    @property
    def capture_store(self) -> Path:
        return self.inside(self.stage_dir(Stage.CAPTURE) / "stats.zarr")

    def fit_dir(self, method: str) -> Path:
        return self.stage_dir(Stage.fit(method))

    def fit_stage(self, method: str) -> str:
        return Stage.fit(method)

    def factors_file(self, method: str) -> Path:
        """The index of a fit's factors; its per-block shards lie beside it (see factors.py)."""
        return self.inside(self.fit_dir(method) / "factors.json")

    def spectrum_json(self, method: str) -> Path:
        return self.inside(self.fit_dir(method) / "spectrum.json")

    @property
    def plan_json(self) -> Path:
        return self.inside(self.stage_dir(Stage.SEARCH) / "plan.json")

    @property
    def history_jsonl(self) -> Path:
        return self.inside(self.stage_dir(Stage.SEARCH) / "history.jsonl")

    @property
    def search_checkpoint(self) -> Path:
        return self.inside(self.stage_dir(Stage.SEARCH) / "checkpoint.json")

    @property
    def heal_factors(self) -> Path:
        """The index of the healed factors (LoRA merged in); their shards lie beside it, as a fit's."""
        return self.inside(self.stage_dir(Stage.HEAL) / "factors.json")

    @property
    def heal_checkpoint(self) -> Path:
        """Adapters, optimiser state and step of an unfinished heal (removed when it finishes)."""
        return self.inside(self.stage_dir(Stage.HEAL) / "checkpoint.pt")

    @property
    def heal_losses(self) -> Path:
        return self.inside(self.stage_dir(Stage.HEAL) / "losses.json")

    @property
    def apply_result(self) -> Path:
        return self.apply_result_of(Stage.APPLY)

    def apply_result_of(self, stage: str) -> Path:
        return self.inside(self.stage_dir(stage) / "result.json")

    @property
    def eval_dir(self) -> Path:
        return self.stage_dir("eval")

    def eval_results(self, label: str) -> Path:
        return self.inside(self.stage_dir(Stage.eval(label)) / "results.json")

    @property
    def report_dir(self) -> Path:
        return self.stage_dir(Stage.REPORT)

    @property
    def report_html(self) -> Path:
        return self.inside(self.report_dir / "report.html")

    # ---- manifests ---------------------------------------------------------------
    def read_manifest(self, stage: str) -> dict | None:
        path = self.manifest_path(stage)
        if not path.exists():
            return None
        manifest = read_json(path, rebuild=f"{self.command_for(stage)} --force")
        if not isinstance(manifest, dict):
            raise WorkspaceError(f"{path} is not a stage manifest; delete it and rerun `{self.command_for(stage)}`")
        return manifest

    def manifest_hash(self, stage: str) -> str | None:
        """What a later stage records of `stage`: a hash of what it was made from and what it wrote.

        Not of the manifest file, whose time stamp changes when a stage is rerun with --force on
        the same inputs: such a rerun writes the same files and must not make later stages stale.
        """
        path = self.manifest_path(stage)
        if not path.exists():
            return None
        manifest = self.read_manifest(stage) or {}
        return sha256_json({key: manifest.get(key) for key in ("stage", "complete", "inputs", "files")})

    def command_for(self, stage: str) -> str:
        """The command that (re)makes `stage` in this workspace (with the strategy an unfinished search used)."""
        base, _, detail = stage.partition("/")
        command = STAGE_COMMANDS.get(base, f"sieve {base} -w {{ws}}").format(ws=self.root)
        if base == Stage.SEARCH:
            command += f" --strategy {self._recorded_strategy()}"
        if base == Stage.APPLY and detail == "healed":
            command += " --healed"
        return command + (f" --method {detail}" if base == "fit" and detail else "")

    def _recorded_strategy(self) -> str:
        try:  # read directly: read_manifest's own message would ask for this command again
            manifest = json.loads(self.manifest_path(Stage.SEARCH).read_text())
        except (OSError, ValueError):
            manifest = {}
        inputs = manifest.get("inputs") if isinstance(manifest, dict) else None
        strategy = ((inputs or {}).get("options") or {}).get("strategy")
        return strategy if strategy in STRATEGIES else "uniform"

    def require(self, stage: str) -> dict:
        """The completed manifest of `stage`, or an error naming the command that makes it.

        A manifest that says complete while a file it lists is gone is an error too, so a
        later stage never reads half a stage.
        """
        manifest = self.read_manifest(stage)
        if manifest is None or not manifest.get("complete"):
            state = "has not finished" if manifest else "has no"
            raise MissingStageError(
                f"workspace {self.root} {state} {stage} stage; run `{self.command_for(stage)}` first"
            )
        missing = self.missing_files(manifest)
        if missing:
            raise MissingStageError(
                f"{self.root / missing[0]}, written by the {stage} stage, is missing; "
                f"run `{self.command_for(stage)} --force` to rebuild it"
            )
        changed = self.changed_files(manifest)
        if changed:
            raise WorkspaceError(
                f"{self.root / changed[0]} is not what the {stage} stage wrote (damaged or edited since); "
                f"run `{self.command_for(stage)} --force` to rebuild it"
            )
        return manifest

    def verify_folder(self, stage: str, folder: Path) -> None:
        """Every file of `folder` (e.g. the capture store) has the content `stage` recorded: one line if not.

        Called once by the stage that reads the folder whole, since hashing it is not free.
        """
        record = (self.require(stage).get("files") or {}).get(str(Path(folder).relative_to(self.root)))
        recorded = record.get("sha256") if isinstance(record, dict) else None
        if not isinstance(recorded, dict):
            return  # written before folders were hashed
        for name, digest in recorded.items():
            path = Path(folder) / name
            if not path.is_file() or sha256_file(path) != digest:
                raise WorkspaceError(
                    f"{path} is not what the {stage} stage wrote (damaged or edited since); "
                    f"run `{self.command_for(stage)} --force` to rebuild it"
                )

    def changed_files(self, manifest: dict) -> list[str]:
        """Listed files whose size or content hash differs from the manifest's record.

        Sizes are checked for every file; content hashes for files up to CHECKED_BYTES (plans,
        manifests of matrices, splits, spectra, factor indexes: the small files whose silent
        corruption would change what later stages do). Large files carry their own checks
        (factor shards are hashed when first read).
        """
        files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
        changed = []
        for name, record in files.items():
            path = self.root / name
            if isinstance(record, dict) and record.get("kind") == "dir" and path.is_dir():
                now = _describe_file(path, hashes=False)
                if (now["files"], now["bytes"]) != (record.get("files"), record.get("bytes")):
                    changed.append(name)  # a store with a chunk deleted, added or cut
                continue
            if not isinstance(record, dict) or record.get("kind") != "file" or not path.is_file():
                continue
            size = path.stat().st_size
            if size != record.get("bytes") or (
                    size <= CHECKED_BYTES and "sha256" in record and sha256_file(path) != record["sha256"]):
                changed.append(name)
        return changed

    def missing_files(self, manifest: dict) -> list[str]:
        """The files a manifest lists that are no longer in the workspace."""
        files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
        return [name for name in files if not self.inside(self.root / name).exists()]  # a planted link: one line

    def upstream_hashes(self, *stages: str) -> dict[str, str]:
        """Hashes of the (required, up-to-date) upstream manifests, recorded as a stage's inputs."""
        hashes = {}
        for stage in stages:
            self.require_fresh(stage)
            hashes[stage] = self.manifest_hash(stage)
        return hashes

    def require_fresh(self, stage: str) -> dict:
        """`require(stage)`, and every stage it was made from unchanged since, through the whole chain.

        A fit made from a capture that was redone since is stale even though the fit's own
        manifest is intact: later stages must not use it.
        """
        manifest = self.require(stage)
        recorded = (manifest.get("inputs") or {}).get("upstream")
        for upstream, digest in (recorded.items() if isinstance(recorded, dict) else []):
            if upstream.partition("/")[0] not in STAGE_COMMANDS:
                continue  # not a workspace stage (the Python API records its matrices here)
            if self.manifest_hash(upstream) != digest:
                raise StaleStageError(
                    f"{stage} in {self.root} was made from an earlier {upstream} stage ({upstream} was rerun or "
                    f"removed since); run `{self.command_for(stage)} --force` to rebuild it from the current one"
                )
            self.require_fresh(upstream)
        return manifest

    def begin(self, stage: str, inputs: dict, force: bool = False) -> bool:
        """Decide whether `stage` must run for these `inputs`.

        Returns False when complete outputs made from the same inputs exist (a no-op),
        True when the stage should run (fresh, resuming an unfinished run with the same
        inputs, or replacing with --force). Raises StaleStageError when outputs made
        from other inputs exist and `force` is not set. When it returns True, an
        unfinished manifest is written so a crash is later recognised as resumable.
        """
        self.lock()
        try:
            manifest = self.read_manifest(stage)
        except (InputError, WorkspaceError):
            if not force:
                raise
            manifest = None  # --force replaces a damaged manifest, as the error says it will
        if manifest is not None and not force:
            same = manifest.get("inputs") == _normalise(inputs)
            if same and manifest.get("complete"):
                if not self.missing_files(manifest):
                    return False
                log.info("%s: files %s are missing; rebuilding them", stage, ", ".join(self.missing_files(manifest)))
            changed = describe_changes(manifest.get("inputs") or {}, _normalise(inputs))
            if not same and not manifest.get("complete"):
                log.info("%s: an unfinished run with other inputs is on disk; starting over", stage)
                force = True  # a crashed run made nothing a later stage uses: just restart
            elif not same and self.replace_stale:
                log.info("%s: inputs %s; re-running it", stage, changed)
                force = True
            elif not same:
                raise StaleStageError(
                    f"{stage} outputs in {self.root} were made from other inputs ({changed}); "
                    f"rerun with --force to replace them"
                )
        if force and manifest is not None and manifest.get("inputs") != _normalise(inputs):
            self.manifest_path(stage).unlink()
        self._write_manifest(stage, inputs, complete=False, files={}, summary={})
        return True

    def lock(self) -> None:
        """Hold the workspace for this process, so two runs never write one store at once.

        An advisory lock on WS/.lock, taken once per process and released when it exits
        (also when it is killed), so a crash never leaves a stale lock behind.
        """
        if self.root in _HELD_LOCKS:
            return
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        handle = os.fdopen(open_no_follow(self.root / ".lock", os.O_RDWR | os.O_CREAT), "r+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise WorkspaceError(
                f"workspace {self.root} is in use by {holder}; wait for it to finish or stop it"
            ) from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        _HELD_LOCKS[self.root] = handle

    def unlock(self) -> None:
        """Let other processes use the workspace again (the Python API, between calls)."""
        handle = _HELD_LOCKS.pop(self.root, None)
        if handle is not None:
            handle.close()  # closing the file releases the flock

    @contextlib.contextmanager
    def held(self) -> Iterator["Workspace"]:
        """Hold the lock for the block; release it after unless it was held before."""
        held_before = self.root in _HELD_LOCKS
        self.lock()
        try:
            yield self
        finally:
            if not held_before:
                self.unlock()

    def resumable(self, stage: str, inputs: dict) -> bool:
        """True when an unfinished run of `stage` with exactly these inputs is on disk (a damaged
        manifest is not: `begin` refuses it, or replaces it with --force)."""
        try:
            manifest = self.read_manifest(stage)
        except (InputError, WorkspaceError):
            return False
        return bool(manifest and not manifest.get("complete") and manifest.get("inputs") == _normalise(inputs))

    def finish(self, stage: str, inputs: dict, files: list[Path], summary: dict | None = None) -> dict:
        """Mark `stage` complete: record its inputs, the files it wrote and a summary."""
        listed = {str(Path(f).relative_to(self.root)): _describe_file(Path(f)) for f in files}
        return self._write_manifest(stage, inputs, complete=True, files=listed, summary=summary or {})

    def _write_manifest(self, stage: str, inputs: dict, complete: bool, files: dict, summary: dict) -> dict:
        manifest = {
            "schema": SCHEMA_VERSION,
            "stage": stage,
            "sieve_version": __version__,
            "complete": complete,
            "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "inputs": _normalise(inputs),
            "files": files,
            "summary": summary,
        }
        write_json_atomic(self.manifest_path(stage), manifest)
        return manifest


_HELD_LOCKS: dict[Path, Any] = {}  # workspace root -> open lock file, for the life of the process


def _normalise(obj: Any) -> Any:
    """The JSON round-trip of `obj`, so tuples and lists, paths and strings compare equal."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def describe_changes(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not keys:
        return "nothing changed"
    parts = []
    for key in keys:
        if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
            sub = sorted(k for k in set(old[key]) | set(new[key]) if old[key].get(k) != new[key].get(k))
            parts.append(f"{key}: {', '.join(sub)}")
        else:
            parts.append(key)
    return "changed " + "; ".join(parts)


def _describe_file(path: Path, hashes: bool = True) -> dict:
    """What a manifest records of a file (size, sha256) or a folder (file count, bytes, and the
    sha256 of every file in it, which `Workspace.verify_folder` checks before the folder is read)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        record = {"kind": "dir", "files": len(files), "bytes": sum(p.stat().st_size for p in files)}
        if hashes:
            record["sha256"] = {str(p.relative_to(path)): sha256_file(p) for p in files}
        return record
    return {"kind": "file", "bytes": path.stat().st_size, "sha256": sha256_file(path)}
