import json

import pytest

from sieve_cli.errors import InputError, MissingStageError, StaleStageError
from sieve_cli.files import write_json_atomic
from sieve_cli.workspace import Workspace


def test_require_names_the_command_to_run(tmp_path):
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(MissingStageError, match=r"run `sieve capture -w .* --task TASK.yaml` first"):
        ws.require("capture")


def test_begin_finish_noop_stale_force(tmp_path):
    ws = Workspace(tmp_path)
    inputs = {"options": {"tokens": 10}, "upstream": {"discover": "abc"}}
    assert ws.begin("capture", inputs) is True
    with pytest.raises(MissingStageError, match="has not finished"):
        ws.require("capture")
    out = ws.stage_dir("capture") / "x.bin"
    out.write_bytes(b"12345")
    ws.finish("capture", inputs, [out], {"tokens": 10})
    manifest = ws.require("capture")
    assert manifest["files"]["capture/x.bin"]["bytes"] == 5
    assert manifest["schema"] == 1 and manifest["complete"]
    # unchanged inputs: nothing to do (tuples and lists compare equal after the JSON round trip)
    assert ws.begin("capture", {"options": {"tokens": 10}, "upstream": {"discover": "abc"}}) is False
    changed = {"options": {"tokens": 20}, "upstream": {"discover": "abc"}}
    with pytest.raises(StaleStageError, match=r"changed options: tokens.*--force"):
        ws.begin("capture", changed)
    assert ws.begin("capture", changed, force=True) is True
    assert ws.read_manifest("capture")["complete"] is False


def test_unfinished_run_with_same_inputs_resumes(tmp_path):
    ws = Workspace(tmp_path)
    inputs = {"options": {"a": 1}}
    ws.begin("fit/output", inputs)
    assert ws.resumable("fit/output", inputs)
    assert ws.begin("fit/output", inputs) is True  # no error: same inputs, unfinished
    assert not ws.resumable("fit/output", {"options": {"a": 2}})


def test_upstream_hash_changes_when_upstream_reruns(tmp_path):
    ws = Workspace(tmp_path)
    ws.begin("discover", {"m": 1})
    ws.finish("discover", {"m": 1}, [])
    first = ws.upstream_hashes("discover")
    ws.begin("discover", {"m": 2}, force=True)
    ws.finish("discover", {"m": 2}, [])
    assert ws.upstream_hashes("discover") != first


def test_atomic_json_and_bad_json(tmp_path):
    path = tmp_path / "a.json"
    write_json_atomic(path, {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
    assert not list(tmp_path.glob(".a.json*"))
    ws = Workspace(tmp_path / "ws")
    ws.manifest_path("fit").parent.mkdir(parents=True)
    ws.manifest_path("fit").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        ws.require("fit")


def test_workspace_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(InputError, match="is a file"):
        Workspace(f)


def test_a_second_process_cannot_use_a_busy_workspace(tmp_path):
    import subprocess
    import sys
    import textwrap

    ws = Workspace(tmp_path / "ws")
    ws.begin("capture", {"a": 1})  # this process now holds the workspace
    ws.begin("fit/output", {"a": 1})  # and may keep using it
    code = textwrap.dedent(f"""
        from sieve_cli.workspace import Workspace
        from sieve_cli.errors import WorkspaceError
        try:
            Workspace({str(tmp_path / "ws")!r}).begin("capture", {{"a": 1}})
        except WorkspaceError as exc:
            print("refused:", exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "refused:" in out and "in use by pid" in out


def test_a_complete_stage_whose_file_is_gone_is_named_in_one_line(tmp_path):
    from sieve_cli.errors import MissingStageError
    from sieve_cli.files import write_json_atomic

    ws = Workspace(tmp_path / "ws")
    inputs = {"options": {"a": 1}}
    assert ws.begin("search", inputs)
    write_json_atomic(ws.plan_json, {"x": 1})
    ws.finish("search", inputs, [ws.plan_json])
    assert ws.require("search")["complete"]
    ws.plan_json.unlink()
    with pytest.raises(MissingStageError, match=r"plan\.json, written by the search stage, is missing.*--force"):
        ws.require("search")
    # the stage itself, rerun with the same inputs, rebuilds instead of calling itself up to date
    assert ws.begin("search", inputs) is True


def test_a_garbled_manifest_is_one_line_and_force_replaces_it(tmp_path):
    from sieve_cli.errors import SieveError

    ws = Workspace(tmp_path / "ws")
    ws.manifest_path("capture").parent.mkdir(parents=True)
    ws.manifest_path("capture").write_text("[]")
    with pytest.raises(SieveError, match="not a stage manifest"):
        ws.begin("capture", {"options": {}})
    ws.manifest_path("capture").write_text("{garbled")
    with pytest.raises(SieveError, match=r"not valid JSON.*sieve capture .*--force"):
        ws.begin("capture", {"options": {}})
    assert ws.begin("capture", {"options": {}}, force=True) is True  # what the message promised
    assert ws.read_manifest("capture")["complete"] is False


def test_a_plan_rank_of_true_is_refused_not_read_as_one():
    from sieve_cli.errors import InputError
    from sieve_cli.plan import Plan

    with pytest.raises(InputError, match="rank of m must be a non-negative integer"):
        Plan.parse({"method": "output", "matrices": {"m": {"rank": True}}})
    assert Plan.parse({"method": "output", "matrices": {"m": {"rank": 3}, "n": {"rank": None}}}).ranks() == {"m": 3, "n": None}


def test_a_file_edited_after_its_stage_finished_is_refused_in_one_line(tmp_path):
    """A plan garbled in place (valid JSON, other ranks) must not be executed silently."""
    from sieve_cli.errors import WorkspaceError
    from sieve_cli.files import write_json_atomic

    ws = Workspace(tmp_path / "ws")
    inputs = {"options": {}}
    ws.begin("search", inputs)
    write_json_atomic(ws.plan_json, {"method": "output", "matrices": {"m": {"rank": 12}}})
    ws.finish("search", inputs, [ws.plan_json])
    ws.require("search")
    ws.plan_json.write_text(ws.plan_json.read_text().replace("12", "13"))  # same size, other content
    with pytest.raises(WorkspaceError, match=r"plan\.json is not what the search stage wrote.*--force"):
        ws.require("search")
