"""Hardening (issue 28): a received workspace, pruned folder or model folder can neither write outside
where sieve owns, nor make sieve vouch for changed code, nor hang it; damaged files are one line.

Every test stages one scenario on a tiny model and checks what a user sees (exit code, the one
`error:` line) and that no file outside the workspace and OUT changed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sieve_cli.cli import app
from sieve_cli.options import (
    CaptureOptions,
    FitOptions,
    HealOptions,
    ReportOptions,
    RunOptions,
    SearchOptions,
    SplitOptions,
)
from sieve_cli.workspace import Workspace

from .test_tasks import write_task

runner = CliRunner()
CAPTURE = ("--tokens", "2000", "--seq-len", "64")


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *needles: str) -> str:
    """The CLI failed with exit 1 and one `error:` line holding every needle, no traceback; the line."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)
    return errors[0]


def snapshot(folder: Path) -> dict:
    """Every entry under `folder` (not following links): its kind, mode and bytes."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            found[str(path)] = ("link", os.readlink(path))
        elif path.is_file():
            found[str(path)] = ("file", path.stat().st_mode, path.read_bytes())
        else:
            found[str(path)] = ("dir", path.stat().st_mode)
    return found


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_dir):
    """A workspace through every stage (discover .. apply, heal, report) and its pruned folder."""
    from sieve_cli.heal import run_heal
    from sieve_cli.pipeline import run_pipeline
    from sieve_cli.report import run_report

    root = tmp_path_factory.mktemp("built")
    task = write_task(root, "text_modelling")
    run_pipeline(RunOptions(fit=FitOptions(method="output"), model=str(tiny_dir), task=str(task), workspace=root / "ws", out=root / "pruned",
                            capture=CaptureOptions(tokens=2000, seq_len=64), split=SplitOptions(max_search=6, max_test=6),
                            search=SearchOptions(method="output", grid_step=0.1)))
    ws = Workspace(root / "ws")
    run_heal(ws, HealOptions(steps=2, seq_len=32, checkpoint_every=1))
    run_report(ws, ReportOptions())
    ws.unlock()
    return root


@pytest.fixture
def copy(built, tmp_path):
    """(workspace, pruned folder, outside): fresh copies of the built ones, and a folder of the user's files."""
    shutil.copytree(built / "ws", tmp_path / "ws", ignore=shutil.ignore_patterns(".lock"))
    shutil.copytree(built / "pruned", tmp_path / "pruned")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("the user's file\n")
    return tmp_path / "ws", tmp_path / "pruned", outside


# ==== 1. no write or delete through a planted link ==========================================================
# the command that rewrites each stage's files
COMMANDS = {
    "discover": lambda ws, out, model: ["discover", model, "-w", ws, "--force"],
    "task": lambda ws, out, model: ["capture", "-w", ws, "--force", *CAPTURE],
    "capture": lambda ws, out, model: ["capture", "-w", ws, "--force", *CAPTURE],
    "blockwise": lambda ws, out, model: ["capture", "-w", ws, "--force", *CAPTURE, "--mode", "blockwise"],
    "fit": lambda ws, out, model: ["fit", "-w", ws, "--force"],
    "search": lambda ws, out, model: ["search", "-w", ws, "--method", "output", "--force", "--grid-step", "0.1"],
    "heal": lambda ws, out, model: ["heal", "-w", ws, "--force", "--steps", "2", "--seq-len", "32",
                                    "--checkpoint-every", "1"],
    "apply": lambda ws, out, model: ["apply", "-w", ws, "-o", out, "--force"],
    "eval": lambda ws, out, model: ["eval", "-w", ws, "--force"],
    "report": lambda ws, out, model: ["report", "-w", ws],
}
# temporaries and folders that exist only while a stage runs
TRANSIENT = {
    "capture": ["capture/stats.zarr.tmp", "capture/stats.zarr.old"],
    "blockwise": ["capture/blockwise", "capture/blockwise/output", "capture/blockwise/hidden-00001.tmp",
                  "capture/blockwise/state.json"],
    "heal": ["heal/checkpoint.pt", "heal/.checkpoint.pt.tmp"],
    "report": ["report/metric.png"],
}


def written_paths(ws: Path, stage: str) -> list[str]:
    """Every file and folder `stage` leaves in the built workspace, and its temporaries."""
    folder = {"blockwise": "capture", "eval": "eval"}.get(stage, stage)
    paths = [str(p.relative_to(ws)) for p in sorted((ws / folder).rglob("*"))] if (ws / folder).is_dir() else []
    return [folder, *paths, *TRANSIENT.get(stage, [])]


def plant(path: Path, outside: Path) -> Path:
    """Replace `path` with a link to a victim outside: a folder holding files of the same names for a
    folder (so a write through it would overwrite them), a file for anything else."""
    victim = outside / f"victim-{len(list(outside.iterdir()))}"
    if path.is_dir() and not path.is_symlink():
        victim.mkdir()
        for child in path.iterdir():
            (victim / child.name).write_text("the user's file\n")
        shutil.rmtree(path)
    else:
        victim.write_text("the user's file\n")
        path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(victim)
    return victim


def assert_refused_or_done_without_touching(result, outside: Path, before: dict) -> None:
    assert "Traceback" not in result.output, result.output
    if result.exit_code != 0:
        one_line_error(result, "symlink")
    assert snapshot(outside) == before, result.output


@pytest.mark.parametrize("stage", sorted(COMMANDS))
def test_no_stage_writes_or_deletes_through_a_planted_link(stage, built, tmp_path, tiny_dir):
    """A link planted at any path the stage writes (its files, folders and temporaries): the stage refuses
    in one line naming the link, or replaces the link, and nothing outside the workspace changes."""
    paths = written_paths(built / "ws", stage)
    assert len(paths) > 1
    for number, name in enumerate(paths):
        case = tmp_path / str(number)
        shutil.copytree(built / "ws", case / "ws", ignore=shutil.ignore_patterns(".lock"))
        shutil.copytree(built / "pruned", case / "pruned")
        outside = case / "outside"
        outside.mkdir()
        plant(case / "ws" / name, outside)
        before = snapshot(outside)
        result = cli(*COMMANDS[stage](case / "ws", case / "out", tiny_dir))
        assert_refused_or_done_without_touching(result, outside, before)
        Workspace(case / "ws").unlock()
        shutil.rmtree(case)


def test_apply_never_writes_through_links_beside_out(copy, tmp_path):
    ws, _, outside = copy
    out = tmp_path / "out"
    victim_dir = outside / "dir"
    victim_dir.mkdir()
    (victim_dir / "keep.txt").write_text("mine\n")
    (out.parent / f".{out.name}.tmp-{os.getpid()}").symlink_to(victim_dir)  # the temporary's name
    (out.parent / f".{out.name}.old-{os.getpid()}").symlink_to(victim_dir)
    before = snapshot(outside)
    result = cli("apply", "-w", ws, "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert snapshot(outside) == before
    assert (out / "sieve.json").is_file()
    assert not (out.parent / f".{out.name}.lock").exists()  # no lock left beside OUT


def test_apply_cleanup_takes_out_literally_and_runs_after_the_guards(copy, tmp_path):
    """`-o 'outs/*'` once removed every `outs/.X.tmp-N` folder: another writer's."""
    ws, _, _ = copy
    outs = tmp_path / "outs"
    theirs = outs / ".theirs.tmp-4242"
    theirs.mkdir(parents=True)
    (theirs / "work.bin").write_text("someone else's\n")
    (outs / "theirs").mkdir()
    (outs / "theirs" / "model.txt").write_text("not ours\n")
    before = snapshot(outs)
    result = cli("apply", "-w", ws, "-o", outs / "theirs")
    one_line_error(result, "not empty")
    result = cli("apply", "-w", ws, "-o", str(outs / "*"))
    assert "Traceback" not in result.output, result.output
    after = snapshot(outs)
    assert all(after.get(name) == entry for name, entry in before.items()), result.output  # theirs untouched
    assert not [p for p in outs.iterdir() if p.name.endswith(".lock")]


def test_refused_apply_into_the_workspace_creates_nothing_there(copy):
    ws, _, _ = copy
    before = snapshot(ws)
    one_line_error(cli("apply", "-w", ws, "-o", ws / "inside"), "overlaps the workspace")
    assert snapshot(ws) == before


# ==== 2. sieve vouches only for the files apply wrote ========================================================
def test_edited_modeling_file_is_refused_before_the_lm_eval_command(copy, tmp_path):
    ws, out, _ = copy
    modeling = out / "modeling_sieve.py"
    modeling.write_text("import os; os.system('echo pwned')\n" + modeling.read_text())
    result = cli("eval", "-w", ws, "--model", out, "--lm-eval-yaml", tmp_path / "lm")
    line = one_line_error(result, "modeling_sieve.py", "not the file sieve apply wrote", "sieve apply -o")
    assert "lm_eval" not in result.output.replace(line, "") and not (tmp_path / "lm").exists()
    one_line_error(cli("eval", "-w", ws, "--model", out), "modeling_sieve.py", "not the file sieve apply wrote")


def test_pruned_folder_records_a_hash_of_every_file(copy):
    from sieve_cli.files import sha256_file

    _, out, _ = copy
    info = json.loads((out / "sieve.json").read_text())
    assert set(info["sha256"]) == set(info["files"]) - {"sieve.json"}
    assert all(sha256_file(out / name) == digest for name, digest in info["sha256"].items())


@pytest.mark.parametrize("damage", ["config_truncated", "tokenizer_deleted", "weights_edited"])
def test_edited_pruned_folder_is_one_line_for_eval_and_load_pruned(copy, damage):
    from sieve_cli.errors import InputError
    from sieve_cli.pruned import load_pruned

    ws, out, _ = copy
    if damage == "config_truncated":
        (out / "config.json").write_text("{")
    elif damage == "tokenizer_deleted":
        (out / "tokenizer.json").unlink()
    else:
        data = bytearray((out / "model.safetensors").read_bytes())
        data[-1] ^= 1
        (out / "model.safetensors").write_bytes(bytes(data))
    one_line_error(cli("eval", "-w", ws, "--model", out), "sieve apply -o")
    with pytest.raises(InputError, match="sieve apply -o"):
        load_pruned(out)


@pytest.mark.parametrize("damage", ["rank_off_by_one", "unknown_module"])
def test_edited_sieve_json_is_one_line(copy, damage):
    ws, out, _ = copy
    info = json.loads((out / "sieve.json").read_text())
    name, shell = next(iter(info["factored"].items()))
    if damage == "rank_off_by_one":
        shell["rank"] += 1
    else:
        info["factored"]["model.layers.0.no_such_module"] = info["factored"].pop(name)
    (out / "sieve.json").write_text(json.dumps(info))
    one_line_error(cli("eval", "-w", ws, "--model", out), "does not match", "sieve apply -o")


# ==== 3. bounded templates =================================================================================
@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ sentence }}",
    "{{ 'x' * 10**10 }}{{ sentence }}",
    "{{ sentence|center(10**10) }}",
    "{{ '{:>10000000000}'.format(sentence) }}",
    "{{ 10 ** (10 ** 10) }}",
])
def test_runaway_template_is_one_line_naming_the_field(template, tmp_path, tiny_dir, monkeypatch):
    import time

    from sieve_cli.tasks import render

    monkeypatch.setattr(render, "MAX_SECONDS", 0.5)
    assert cli("discover", tiny_dir, "-w", tmp_path / "ws").exit_code == 0
    task = write_task(tmp_path, "text_modelling", doc_to_text=template)
    started = time.perf_counter()
    result = cli("capture", "-w", tmp_path / "ws", "--task", task, *CAPTURE)
    one_line_error(result, "doc_to_text", "asks for too much")
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "ws" / "task" / "split.json").exists()


# ==== 5. damaged inputs: one line, and --force recovers ======================================================
def test_cut_heal_checkpoint_is_one_line_and_force_recovers(copy):
    from sieve_cli.heal import run_heal

    ws, _, outside = copy
    heal = ["heal", "-w", ws, "--steps", "4", "--seq-len", "32", "--checkpoint-every", "1"]
    assert run_heal(Workspace(ws), HealOptions(steps=4, seq_len=32, checkpoint_every=1), force=True,
                    stop_after=2) == {"stopped_at": 2, "complete": False}
    Workspace(ws).unlock()
    checkpoint = ws / "heal" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    before = snapshot(outside)
    one_line_error(cli(*heal), "checkpoint.pt is damaged", f"sieve heal -w {ws} --force")
    result = cli(*heal, "--force")
    assert result.exit_code == 0, result.output
    assert not checkpoint.exists() and json.loads((ws / "heal" / "manifest.json").read_text())["complete"]
    assert snapshot(outside) == before


@pytest.mark.parametrize("stage", ["search", "heal"])
def test_garbled_manifest_is_one_line_and_force_rebuilds_it(copy, stage):
    ws, _, _ = copy
    command = {"search": ["search", "-w", ws, "--method", "output", "--grid-step", "0.1"],
               "heal": ["heal", "-w", ws, "--steps", "2", "--seq-len", "32", "--checkpoint-every", "1"]}[stage]
    (ws / stage / "manifest.json").write_text('{"stage": ')
    one_line_error(cli(*command), "manifest.json is not valid JSON", "--force")
    result = cli(*command, "--force")
    assert result.exit_code == 0, result.output
    assert json.loads((ws / stage / "manifest.json").read_text())["complete"]


def test_garbled_search_checkpoint_is_one_line_and_force_starts_over(copy):
    from sieve_cli.search import run_search

    ws, _, _ = copy
    manifest = json.loads((ws / "search" / "manifest.json").read_text())
    (ws / "search" / "manifest.json").write_text(json.dumps(manifest | {"complete": False}))  # killed mid-search
    (ws / "search" / "checkpoint.json").write_text('{"dense": ')
    command = ["search", "-w", ws, "--method", "output", "--grid-step", "0.1"]
    one_line_error(cli(*command), "checkpoint.json is not valid JSON", "--force")
    result = cli(*command, "--force")
    assert result.exit_code == 0, result.output
    assert not (ws / "search" / "checkpoint.json").exists()
    assert run_search  # the API is the same function


def test_partial_last_history_line_does_not_break_the_report(copy):
    ws, _, _ = copy
    with open(ws / "search" / "history.jsonl", "a") as f:
        f.write('{"removed_fraction": 0.')
    result = cli("report", "-w", ws)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("damage", ["truncated", "pickle_only"])
def test_unreadable_input_weights_are_one_line_at_discover(damage, tmp_path, tiny_dir):
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    weights = folder / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        needle = "cut short"
    else:
        torch.save(load_file(weights), folder / "pytorch_model.bin")
        weights.unlink()
        needle = "pickle"
    before = snapshot(folder)
    one_line_error(cli("discover", folder, "-w", tmp_path / "ws"), str(folder), needle)
    assert snapshot(folder) == before


def test_a_file_past_the_size_limit_is_one_line(copy, tmp_path):
    """EFBIG (a FAT32 disk, `ulimit -f`): safetensors words it "File too large"."""
    import subprocess
    import sys

    ws, pruned, outside = copy
    limit_kib = (pruned / "model.safetensors").stat().st_size // 2048  # half the weights file
    before = snapshot(outside)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    command = f"ulimit -f {limit_kib}; exec {sys.executable} -c 'from sieve_cli.cli import main; main()' apply -w {ws} -o {tmp_path / 'out'} --force"
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "size limit" in errors[0], output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))  # no half model, no lock
    assert snapshot(outside) == before


# ==== 6. umask, the API's lock ===============================================================================
def test_weights_and_shards_follow_the_umask(built):
    mask = os.umask(0o022)
    os.umask(mask)
    files = [built / "pruned" / "model.safetensors", *(built / "ws" / "fit" / "output").glob("*.safetensors"),
             *(built / "ws" / "heal").glob("*.safetensors"), *(built / "ws" / "report").glob("*.png")]
    assert len(files) >= 4
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {oct(0o666 & ~mask)}


def test_stage_functions_from_python_release_the_lock(tmp_path, tiny_dir):
    import fcntl

    import sieve_cli
    from sieve_cli.options import DiscoverOptions

    sieve_cli.run_discover(Workspace(tmp_path / "ws"), DiscoverOptions(model=str(tiny_dir)))
    with open(tmp_path / "ws" / ".lock", "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process could take it now


# ==== 7. -q silences the third-party bars ==================================================================
BARS = (
    "import sys\n"
    "from sieve_cli.commands.common import setup\n"
    "{before}"
    "setup(False, {quiet})\n"
    "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'huggingface_hub') if m in sys.modules))\n"
    "from transformers.utils.logging import tqdm as weights_bar\n"
    "from huggingface_hub.utils import tqdm as download_bar\n"
    "from datasets.utils import tqdm as datasets_bar\n"
    "for name, bar in (('Loading weights', weights_bar), ('Downloading', download_bar), ('Generating', datasets_bar)):\n"
    "    list(bar(range(3), desc=name))\n"
)


@pytest.mark.parametrize("imported_first", [False, True])
def test_quiet_silences_the_third_party_bars_without_importing_them(imported_first):
    """transformers' "Loading weights" bar (a quantised folder under `eval --model`), huggingface_hub's and datasets'
    bars: off with -q, whether the library is imported after the CLI set up (the CLI) or before (the API)."""
    import subprocess
    import sys

    before = "import datasets, transformers\n" if imported_first else ""
    env = {k: v for k, v in os.environ.items() if not k.endswith("DISABLE_PROGRESS_BARS")}
    runs = {quiet: subprocess.run([sys.executable, "-c", BARS.format(before=before, quiet=quiet)], capture_output=True,
                                  text=True, env=env, cwd=Path(__file__).parents[1], timeout=120)
            for quiet in (False, True)}
    for done in runs.values():
        assert done.returncode == 0, done.stderr
    assert all(name in runs[False].stderr for name in ("Loading weights", "Downloading", "Generating"))  # drawn
    assert not any(name in runs[True].stderr for name in ("Loading weights", "Downloading", "Generating")), runs[True].stderr
    if not imported_first:
        assert runs[True].stdout.strip() == "[]"  # setting up -q imported none of them


# ==== 8. leftovers of killed runs ==========================================================================
def test_a_killed_writers_temporaries_are_removed_by_the_next_write(tmp_path):
    """Each SIGKILL between atomic_path's temporary and its rename left a `.NAME.*.tmp` for good; the next write
    of NAME removes those of dead writers, and only those (a live writer's, another file's, a folder stay)."""
    import subprocess
    import sys

    from sieve_cli.files import write_json_atomic

    target = tmp_path / "manifest.json"
    killed = ("import os, signal, sys\nfrom pathlib import Path\nfrom sieve_cli.files import atomic_path\n"
              "with atomic_path(Path(sys.argv[1])) as tmp:\n    tmp.write_text('half')\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    for _ in range(2):  # the second killed writer removed the first one's temporary before it made its own
        done = subprocess.run([sys.executable, "-c", killed, str(target)], cwd=Path(__file__).parents[1], timeout=60)
        assert done.returncode == -9
        abandoned = [p.name for p in tmp_path.iterdir()]
        assert len(abandoned) == 1 and abandoned[0].startswith(".manifest.json.") and abandoned[0].endswith(".tmp")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        keep = [f".manifest.json.{live.pid}.abcd1234.tmp",  # a writer still at work
                ".manifest.json.old.1.abcd1234.tmp",  # a temporary of another file (manifest.json.old)
                ".manifest.json.x.tmp"]  # not one of sieve's names
        for name in keep:
            (tmp_path / name).write_text("someone's\n")
        (tmp_path / ".manifest.json.1.folder12.tmp").mkdir()
        write_json_atomic(target, {"a": 1})
    finally:
        live.kill()
        live.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, ".manifest.json.1.folder12.tmp", "manifest.json"])


@pytest.mark.parametrize("stage", ["capture", "fit"])
def test_a_killed_blockwise_runs_folder_goes_when_the_stage_later_completes(copy, stage):
    """A block-wise capture (or a fit's block-wise refit) killed mid-way leaves its per-block results in
    `capture/blockwise/` (`fit/output/blockwise/`); the stage later done another way removes them."""
    ws, _, _ = copy
    work = ws / ("capture" if stage == "capture" else "fit/output") / "blockwise"
    (work / "output").mkdir(parents=True)
    (work / "output" / "block-00000.safetensors").write_bytes(b"a killed run's block\n")
    (work / "state.json").write_text('{"blocks_done": 1}\n')
    args = ["capture", "-w", ws, "--force", *CAPTURE] if stage == "capture" else ["fit", "-w", ws, "--method", "output", "--force"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert not work.exists()
