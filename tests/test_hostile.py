"""Hostile input and damaged workspaces (issue 14): nothing lost, nothing executed, nothing silently wrong.

Each test stages one scenario on a tiny model and checks the observable outcome: a file that
must survive, a marker file code would have created, a one-line error naming the file and
the command that rebuilds it.
"""

from __future__ import annotations

import builtins
import errno
import fcntl
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sieve_cli.cli import app
from sieve_cli.errors import InputError, ModelLoadError, SieveError, StaleStageError, WorkspaceError
from sieve_cli.options import (
    ApplyOptions,
    CaptureOptions,
    DiscoverOptions,
    FitOptions,
    RunOptions,
    SearchOptions,
    SplitOptions,
)
from sieve_cli.workspace import Stage, Workspace

from .test_tasks import write_task
from .tiny import save_tiny

runner = CliRunner()


def one_line_error(result, *needles: str) -> None:
    """The CLI failed with exit 1 and one `error:` line holding every needle, no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


# ---- one finished tiny pipeline, copied per test ---------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_dir):
    """A workspace through every stage (discover .. apply) and its pruned folder."""
    from sieve_cli.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("built")
    task = write_task(root, "text_modelling")
    run_pipeline(RunOptions(fit=FitOptions(method="output"), model=str(tiny_dir), task=str(task), workspace=root / "ws", out=root / "pruned",
                            capture=CaptureOptions(tokens=2000, seq_len=64), split=SplitOptions(max_search=6, max_test=6),
                            search=SearchOptions(method="output", grid_step=0.1)))
    return root


@pytest.fixture
def copy(built, tmp_path):
    """(workspace, pruned folder): fresh copies of the built ones."""
    shutil.copytree(built / "ws", tmp_path / "ws", ignore=shutil.ignore_patterns(".lock"))
    shutil.copytree(built / "pruned", tmp_path / "pruned")
    return tmp_path / "ws", tmp_path / "pruned"


# ==== security ==============================================================================================
def remote_code_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A model folder whose config asks for its own code; importing that code would create `marker`."""
    folder = save_tiny(tmp_path / "evil", "llama")
    marker = tmp_path / "EXECUTED"
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'llama'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    )
    return folder, marker


def test_remote_code_folder_is_refused_without_prompting(tmp_path, monkeypatch):
    folder, marker = remote_code_folder(tmp_path)
    asked = []
    monkeypatch.setattr(builtins, "input", lambda *a: asked.append(a) or "y")  # a user who would say yes
    result = cli("discover", folder, "-w", tmp_path / "ws")
    one_line_error(result, "auto_map")
    assert not marker.exists() and not asked


def test_every_loader_passes_trust_remote_code_false(tmp_path, tiny_dir, copy, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from sieve_cli.evaluate import load_eval_model
    from sieve_cli.models import load_model
    from sieve_cli.options import EvalOptions

    seen = []
    for cls in (AutoConfig, AutoModelForCausalLM, AutoTokenizer):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, **kwargs):
            seen.append((klass.__name__, kwargs.get("trust_remote_code", "absent")))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    load_model(tiny_dir)
    ws, pruned = copy
    load_eval_model(Workspace(ws), EvalOptions(model=str(pruned)))
    assert {name for name, _ in seen} >= {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"}
    assert all(flag is False for _, flag in seen), seen


def test_symlinked_lock_does_not_touch_its_target(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / ".lock").symlink_to(target)
    with pytest.raises(WorkspaceError, match="symlink"):
        Workspace(tmp_path / "ws").lock()
    assert target.read_text() == "keep me"


def test_symlinked_history_does_not_append_outside(copy, tmp_path):
    from sieve_cli.acceptance import Measurement
    from sieve_cli.fit import load_factors
    from sieve_cli.search import Evaluations, Scorer, read_targets

    ws = Workspace(copy[0])
    outside = tmp_path / "outside.jsonl"
    outside.write_text("")
    ws.history_jsonl.unlink()
    ws.history_jsonl.symlink_to(outside)
    with pytest.raises(WorkspaceError):
        targets, _ = read_targets(ws)
        evals = Evaluations(ws, Scorer(lambda ranks: Measurement(0.5)), targets, load_factors(ws, "output"), resume=False)
        evals.metric([0.5] * len(targets), {"strategy": "uniform", "p": 0.5})
    assert outside.read_text() == ""


def test_plan_method_path_traversal_is_refused(copy, tmp_path):
    ws, _ = copy
    plan = json.loads((ws / "search" / "plan.json").read_text())
    plan["method"] = "../../x"
    outside = tmp_path / "x"  # WS/fit/../../x
    shutil.copytree(ws / "fit" / "output", outside)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    result = cli("apply", "-w", ws, "-o", tmp_path / "out", "--plan", tmp_path / "plan.json")
    one_line_error(result, "method")
    assert not (tmp_path / "out").exists()
    with pytest.raises(WorkspaceError, match="outside"):
        Workspace(ws).stage_dir("fit/../../x")


# ==== data loss: apply writes only what it owns ==================================================================
def test_apply_into_the_workspace_is_refused(copy):
    ws, _ = copy
    before = sorted(p.relative_to(ws) for p in ws.rglob("*"))
    result = cli("apply", "-w", ws, "-o", ws, "--force")
    one_line_error(result, "workspace")
    assert sorted(p.relative_to(ws) for p in ws.rglob("*") if p.name != ".lock") == \
        [p for p in before if p.name != ".lock"]


def test_apply_never_deletes_files_it_did_not_write(copy, tmp_path):
    from sieve_cli.apply import run_apply

    ws, pruned = copy
    (pruned / "notes.txt").write_text("mine")  # the user's file beside our output
    with pytest.raises(InputError, match="notes.txt"):
        run_apply(Workspace(ws), ApplyOptions(out=pruned, dtype="bfloat16"), force=True)
    assert (pruned / "notes.txt").read_text() == "mine" and (pruned / "sieve.json").exists()
    project = tmp_path / "project"  # a folder holding the user's files, whatever they are
    project.mkdir()
    (project / "data.csv").write_text("a,b")
    with pytest.raises(InputError, match="data.csv"):
        run_apply(Workspace(ws), ApplyOptions(out=project), force=True)
    assert (project / "data.csv").read_text() == "a,b"


def test_apply_refuses_another_workspaces_output(copy, tmp_path):
    from sieve_cli.apply import run_apply

    ws, pruned = copy
    other = tmp_path / "other-ws"
    shutil.copytree(ws, other)
    marker = json.loads((pruned / "sieve.json").read_text())
    with pytest.raises(InputError, match="another workspace"):
        run_apply(Workspace(other), ApplyOptions(out=pruned, dtype="bfloat16"), force=True)
    assert json.loads((pruned / "sieve.json").read_text()) == marker


def test_two_applies_to_one_out_are_serialised(copy, tmp_path, monkeypatch):
    """While one apply writes OUT, a second one (here: from inside the first) is refused, not interleaved."""
    from sieve_cli import apply as apply_module

    ws, _ = copy
    other = tmp_path / "other-ws"
    shutil.copytree(ws, other)
    out = tmp_path / "out"
    real, nested, racing = apply_module.save_pruned, [], []

    def save_and_race(*args, **kwargs):
        if racing:  # only the first writer races (on a build without the lock the second gets here too)
            return real(*args, **kwargs)
        racing.append(True)
        try:
            apply_module.run_apply(Workspace(other), ApplyOptions(out=out), force=True)
            nested.append("succeeded")
        except InputError as exc:
            nested.append(str(exc))
        return real(*args, **kwargs)

    monkeypatch.setattr(apply_module, "save_pruned", save_and_race)
    apply_module.run_apply(Workspace(ws), ApplyOptions(out=out), force=True)
    assert nested and "being written" in nested[0], nested


def test_a_killed_applys_temporary_folder_is_removed(copy, tmp_path):
    from sieve_cli.apply import run_apply

    ws, _ = copy
    leftover = tmp_path / ".out.tmp-999999999"  # pid of no live process
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"0" * 1000)
    run_apply(Workspace(ws), ApplyOptions(out=tmp_path / "out"), force=True)
    assert not leftover.exists() and (tmp_path / "out" / "sieve.json").exists()


def test_interrupted_gguf_conversion_is_removed(tmp_path, monkeypatch):
    from sieve_cli import models

    monkeypatch.setenv("SIEVE_CACHE", str(tmp_path / "cache"))
    stale = tmp_path / "cache" / "gguf" / ".tmp-999999999-abcd"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"0" * 1000)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not a gguf")
    with pytest.raises(ModelLoadError):
        models.load_model(gguf)
    assert not stale.exists()


# ==== silent wrong results ===========================================================================================
def test_weights_replaced_after_discover_are_detected(tmp_path):
    from sieve_cli.discover import load_workspace_model, run_discover

    model = save_tiny(tmp_path / "model", "llama", seed=0)
    ws = Workspace(tmp_path / "ws")
    run_discover(ws, DiscoverOptions(model=str(model)))
    weights = model / "model.safetensors"
    os.utime(weights, (time.time() + 5, time.time() + 5))  # touched, same bytes: still the same model
    load_workspace_model(ws)
    save_tiny(tmp_path / "other", "llama", seed=1)
    shutil.copyfile(tmp_path / "other" / "model.safetensors", weights)  # same size, other weights
    with pytest.raises(StaleStageError, match=r"changed since .*sieve discover"):
        load_workspace_model(ws)


def test_discover_stores_the_model_path_absolute(tmp_path, tiny_dir, monkeypatch):
    from sieve_cli.discover import run_discover

    shutil.copytree(tiny_dir, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    ws = Workspace(tmp_path / "ws")
    run_discover(ws, DiscoverOptions(model="model"))
    assert ws.require(Stage.DISCOVER)["inputs"]["options"]["model"] == str((tmp_path / "model").resolve())


def test_staleness_is_transitive(tmp_path):
    """A fit made from an earlier capture is stale for search, though the fit's own manifest is intact."""
    ws = Workspace(tmp_path / "ws")

    def make(stage, inputs):
        ws.begin(stage, inputs, force=True)
        ws.finish(stage, inputs, [])

    make(Stage.DISCOVER, {"model": "m"})
    make(Stage.CAPTURE, {"tokens": 1, "upstream": ws.upstream_hashes(Stage.DISCOVER)})
    make(Stage.fit("output"), {"upstream": ws.upstream_hashes(Stage.DISCOVER, Stage.CAPTURE)})
    ws.upstream_hashes(Stage.fit("output"))  # fresh
    make(Stage.CAPTURE, {"tokens": 2, "upstream": ws.upstream_hashes(Stage.DISCOVER)})  # capture --force
    with pytest.raises(StaleStageError, match=r"fit/output.*capture.*sieve fit"):
        ws.upstream_hashes(Stage.fit("output"))


# ==== one-line errors ==================================================================================================
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(tiny_dir, tmp_path):
    one_line_error(cli("discover", tiny_dir, "-w", tmp_path / "ws", "--device", "cuda"), "CUDA")


@pytest.fixture
def short_model(tmp_path):
    """A tiny llama that has only 24 positions (rotary: it would run past them silently)."""
    from .tiny import CONFIGS

    CONFIGS["short"] = {**CONFIGS["llama"], "max_position_embeddings": 24}
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        from .tiny import tiny_tokenizer

        config = AutoConfig.for_model("llama", **CONFIGS["short"], pad_token_id=0, eos_token_id=1)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "short")
        tiny_tokenizer().save_pretrained(tmp_path / "short")
    finally:
        CONFIGS.pop("short")
    return tmp_path / "short"


def test_sequences_past_the_models_positions_are_one_line(short_model, tmp_path):
    task = write_task(tmp_path, "multiple_choice")
    ws = tmp_path / "ws"
    assert cli("discover", short_model, "-w", ws).exit_code == 0
    one_line_error(cli("capture", "-w", ws, "--task", task, "--seq-len", 64, "--tokens", 500), "--seq-len", "24")
    one_line_error(cli("eval", "-w", ws, "--max-length", 4096, "--limit", 2), "--max-length", "24")


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_in_capture_apply_eval_is_one_line(copy, tmp_path, monkeypatch):
    import safetensors.torch

    from sieve_cli import capture, evaluate

    ws, _ = copy
    monkeypatch.setattr(capture, "write_store", enospc)  # the store writer capture calls
    one_line_error(cli("capture", "-w", ws, "--tokens", 1000, "--force"), "disk")
    monkeypatch.setattr(safetensors.torch, "save_file", enospc)
    one_line_error(cli("apply", "-w", ws, "-o", tmp_path / "out2", "--force"), "disk")
    assert not any(p.name.startswith(".out2.tmp") for p in tmp_path.iterdir())  # no half model left
    monkeypatch.setattr(evaluate, "write_json_atomic", enospc)
    one_line_error(cli("eval", "-w", ws, "--split", "search", "--force"), "disk")


def test_partial_last_history_line_is_repaired_on_resume(copy):
    from sieve_cli.fit import load_factors
    from sieve_cli.search import Evaluations, read_targets

    ws = Workspace(copy[0])
    lines = ws.history_jsonl.read_text().splitlines()
    ws.history_jsonl.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed mid-write
    targets, _ = read_targets(ws)
    evals = Evaluations(ws, None, targets, load_factors(ws, "output"), resume=True)
    assert len(evals.memo) == 1
    assert ws.history_jsonl.read_text() == lines[0] + "\n"


DAMAGED = {  # file -> the command that reads it
    "search/plan.json": ("apply", "-o", "{tmp}/out2"),
    "discover/matrices.json": ("apply", "-o", "{tmp}/out2", "--dry-run"),
    "task/split.json": ("eval", "--split", "search", "--force"),
    "fit/output/spectrum.json": ("search", "--method", "output", "--strategy", "adaptive", "--generations", "0",
                                 "--force"),
}


@pytest.mark.parametrize("damage", ["truncate", "delete"])
@pytest.mark.parametrize("name", list(DAMAGED))
def test_damaged_workspace_file_is_one_line(copy, tmp_path, name, damage):
    ws, _ = copy
    path = ws / name
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.unlink()
    args = [a.format(tmp=tmp_path) for a in DAMAGED[name]]
    one_line_error(cli(args[0], "-w", ws, *args[1:]), name.rsplit("/", 1)[-1], "--force")


@pytest.mark.parametrize("name", ["sieve.json", "model.safetensors"])
def test_truncated_pruned_folder_is_one_line(copy, name):
    ws, pruned = copy
    path = pruned / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    one_line_error(cli("eval", "-w", ws, "--model", pruned, "--limit", 2), name, "sieve apply")


def test_truncated_gguf_cache_copy_is_rebuilt_or_one_line(tmp_path, monkeypatch, tiny_dir):
    from sieve_cli import models

    monkeypatch.setenv("SIEVE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF pretend")
    cached = tmp_path / "cache" / "gguf" / models.sha256_file(gguf)[:32]
    shutil.copytree(tiny_dir, cached)
    weights = cached / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SieveError, match="m.gguf"):  # rebuilt from the (fake) .gguf, which fails in one line
        models.load_model(gguf)


def test_gguf_cache_entry_without_its_weights_is_rebuilt(tmp_path, monkeypatch, tiny_dir):
    """The entry's folder is there, its model.safetensors is not: made again (not returned without weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sieve_cli import models

    monkeypatch.setenv("SIEVE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF pretend")
    cached = tmp_path / "cache" / "gguf" / models.sha256_file(gguf)[:32]
    shutil.copytree(tiny_dir, cached)
    (cached / "model.safetensors").unlink()
    converted = []
    for cls in (AutoTokenizer, AutoModelForCausalLM):  # the conversion, from the tiny folder instead of the .gguf
        original = cls.from_pretrained

        def convert(folder, *args, _original=original, gguf_file=None, **kwargs):
            converted.append(gguf_file)
            return _original(tiny_dir, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", convert)
    models.load_model(gguf)
    assert converted[:2] == ["m.gguf", "m.gguf"]
    assert models._complete_safetensors(cached / "model.safetensors")


def test_sieve_cache_pointing_at_a_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("SIEVE_CACHE", str(tmp_path / "file"))
    (tmp_path / "file").write_text("x")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF pretend")
    one_line_error(cli("discover", gguf, "-w", tmp_path / "ws"), "is a file, not a folder; point SIEVE_CACHE at a folder")


# ==== misleading messages ===============================================================================================
def test_unfinished_stage_with_other_inputs_restarts(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ws.begin(Stage.CAPTURE, {"options": {"tokens": 1}})  # then the process crashed: nothing written
    assert ws.begin(Stage.CAPTURE, {"options": {"tokens": 2}}) is True


def test_rebinding_the_same_task_with_force_keeps_search_fresh(copy, built):
    """`sieve eval --task SAME.yaml --force` rewrites the task stage; search must not become stale."""
    from sieve_cli.tasks import bind_task

    ws = Workspace(copy[0])
    before = ws.upstream_hashes(Stage.TASK)
    time.sleep(1.1)  # the manifest records the second it was written
    bind_task(ws, built / "text_modelling.yaml", force=True)
    assert ws.upstream_hashes(Stage.TASK) == before


def test_apply_hint_after_an_unfinished_adaptive_search_names_adaptive(copy, tmp_path):
    ws = Workspace(copy[0])
    manifest = ws.read_manifest(Stage.SEARCH)
    ws.begin(Stage.SEARCH, {**manifest["inputs"], "options": {**manifest["inputs"]["options"], "strategy": "adaptive"}},
             force=True)
    result = cli("apply", "-w", copy[0], "-o", tmp_path / "out2")
    one_line_error(result, "--strategy adaptive")
    assert "uniform" not in result.output


def test_idle_api_object_releases_the_workspace_lock(tmp_path):
    from sieve_cli import LLMSieveConfig, TransformerPruner

    from .test_api import loader, make_eval_fn
    from .tiny import tiny_model, tiny_tokenizer

    pruner = TransformerPruner(tiny_model("llama"), LLMSieveConfig(calibration_tokens=400, target_accuracy_drop=0.2,
                                                                   workspace=str(tmp_path / "ws")), tiny_tokenizer())
    pruner.uniform_prune(loader(), make_eval_fn())
    with open(tmp_path / "ws" / ".lock", "a+") as other:  # what another process would do
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_output_files_follow_the_umask(tmp_path):
    from sieve_cli.files import write_json_atomic

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


def test_quiet_silences_the_gguf_conversion_bar(tmp_path, monkeypatch, capfd):
    """transformers' GGUF conversion draws a plain tqdm bar: during the call it is sieve's bar, silent when quiet."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from sieve_cli import models, progress

    monkeypatch.setenv("SIEVE_CACHE", str(tmp_path / "cache"))
    progress.enable(False)
    original, seen = gguf_utils.tqdm, []

    def fake_load(*args, **kwargs):
        seen.append((gguf_utils.tqdm is original, list(gguf_utils.tqdm(range(3), desc="Converting"))))
        raise ValueError("stop here")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake_load)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_load)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF pretend")
    with pytest.raises(ModelLoadError):
        models.load_model(gguf)
    assert seen == [(False, [0, 1, 2])]  # replaced for the call, and every item still goes through
    assert gguf_utils.tqdm is original  # put back afterwards
    assert "Converting" not in capfd.readouterr().err


@pytest.mark.parametrize("args", [["discover", "{model}", "--device", "nonsense"],
                                  ["capture", "--task", "{task}", "--search-size", "nan"]])
def test_bad_device_and_nan_size_are_one_line(tiny_dir, tmp_path, args):
    task = write_task(tmp_path, "multiple_choice")
    args = [a.format(model=tiny_dir, task=task) for a in args]
    one_line_error(cli(args[0], "-w", tmp_path / "ws", *args[1:]), args[-2])


def test_full_disk_reported_through_a_library_wrapper_is_one_line():
    from sieve_cli.commands.common import disk_full

    class WrappedError(Exception):
        pass

    try:
        try:
            enospc()
        except OSError as inner:
            raise WrappedError("Error while serializing") from inner
    except WrappedError as outer:
        assert disk_full(outer)
    assert not disk_full(ValueError("bad value"))
