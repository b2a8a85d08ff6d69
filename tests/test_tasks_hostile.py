"""Task files and data as a hostile or careless user writes them (issue 14): each case fails
with one line, runs nothing, and never returns a wrong split or a leaked prompt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from sieve_cli.errors import SieveError, TaskError
from sieve_cli.tasks import SplitOptions, bind_task, load_bound_task, load_task, read_records
from sieve_cli.workspace import Workspace

from .test_tasks import write_task

REPO = Path(__file__).resolve().parents[1]


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


# ---- templates run in a sandbox -----------------------------------------------------------------


def payload(marker: Path) -> str:
    return "{{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').read() }}"


def test_template_payload_does_not_run(tmp_path):
    marker = tmp_path / "PWNED"
    task = write_task(tmp_path, "multiple_choice", doc_to_text=payload(marker))
    with pytest.raises(TaskError) as exc:
        bind_task(Workspace(tmp_path / "ws"), task, split=SplitOptions(search=4, test=8)).examples("test")
    assert "doc_to_text" in one_line(exc)
    assert not marker.exists()


def test_template_payload_in_a_received_workspace_does_not_run(tmp_path):
    """The copy WS/task/task.yaml is rendered again by every later stage: edit it as an attacker would."""
    marker = tmp_path / "PWNED"
    ws = Workspace(tmp_path / "ws")
    bind_task(ws, write_task(tmp_path, "text_modelling"), split=SplitOptions(search=4, test=8))
    copy = yaml.safe_load(ws.task_yaml.read_text())
    copy["doc_to_target"] = payload(marker)
    ws.task_yaml.write_text(yaml.safe_dump(copy))
    # refused as an edited copy (the task stage's recorded hash), and the sandbox would stop it anyway
    with pytest.raises(SieveError) as exc:
        bind_task(ws, None).texts("calibration")
    one_line(exc)
    assert not marker.exists()


# ---- the task file is read with limits ------------------------------------------------------------

BOMB = textwrap.dedent("""\
    task: bomb
    dataset_path: json
    output_type: text_modelling
    doc_to_target: text
    metadata:
      a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
      b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
      c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
      d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
      e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
      f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
      g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
      h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
    data_files: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
""")

LOAD_MEASURED = """
import json, resource, sys, time, types
pkg = types.ModuleType("sieve_cli")  # skip the package's API imports (torch): measure the task loader alone
pkg.__path__ = ["sieve_cli"]
sys.modules["sieve_cli"] = pkg
from sieve_cli.errors import SieveError
from sieve_cli.tasks import load_task
start = time.perf_counter()
try:
    load_task(sys.argv[1]); message = None
except SieveError as exc:
    message = str(exc)
print(json.dumps({"seconds": time.perf_counter() - start, "message": message,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def test_yaml_alias_bomb_fails_fast_with_flat_memory(tmp_path):
    """In a child process capped at 2 GB and 60 s: before the fix it ran out of both."""
    import resource

    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB.encode()) < 700  # the 644-byte class of file

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    baseline = _run_child(LOAD_MEASURED, REPO / "examples" / "tasks" / "mbpp.yaml", cap)
    result = _run_child(LOAD_MEASURED, path, cap)
    assert result["message"] and "alias" in result["message"] and "\n" not in result["message"]
    assert result["seconds"] < 0.5
    assert result["maxrss_mb"] < baseline["maxrss_mb"] + 20  # memory flat: no more than a plain task file


def _run_child(code: str, path: Path, preexec) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True, timeout=60, preexec_fn=preexec,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_recursive_alias_and_oversized_file_are_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("task: loop\nmetadata: &m [1, *m]\n")
    with pytest.raises(TaskError, match="recursive alias") as exc:
        load_task(path)
    one_line(exc)
    path.write_text("task: big\nmetadata: '" + "x" * (1 << 20) + "'\n")
    with pytest.raises(TaskError, match="larger than 1 MiB"):
        load_task(path)


# ---- bytes that are not text -----------------------------------------------------------------------


def test_non_utf8_task_file_is_one_line_naming_it(tmp_path):
    path = write_task(tmp_path, "multiple_choice")
    path.write_bytes(path.read_bytes() + b"# caf\xe9\n")
    with pytest.raises(TaskError) as exc:
        load_task(path)
    assert str(path) in one_line(exc) and "UTF-8" in str(exc.value)


@pytest.mark.parametrize("builder, body", [
    ("json", b'{"sentence": "caf\xe9", "label": 0, "uid": "a", "answer": "x"}\n'),
    ("csv", b"sentence,label,uid,answer\ncaf\xe9,0,a,x\n"),
    ("text", b"caf\xe9 au lait\n"),
])
def test_non_utf8_data_file_is_one_line_naming_it(tmp_path, builder, body):
    data = tmp_path / f"data.{builder}"
    data.write_bytes(body)
    task = load_task(write_task(tmp_path, "text_modelling", dataset_path=builder, data_files=data.name))
    with pytest.raises(TaskError) as exc:
        read_records(task)
    message = one_line(exc)
    assert str(data) in message and "encoding" in message


def rows(builder: str, n: int, last: bytes = b"") -> bytes:
    """n good rows of a `builder` data file (a CSV one after its header), then `last`."""
    row = {"json": b'{"sentence": "s%d", "label": 0, "uid": "u%d", "answer": "x"}\n', "csv": b"s%d,0,u%d,x\n",
           "text": b"line %d u%d\n"}[builder]
    head = b"sentence,label,uid,answer\n" if builder == "csv" else b""
    return head + b"".join(row % (i, i) for i in range(n)) + last


@pytest.mark.parametrize("builder, body, line", [
    ("json", b'{"sentence": "caf\xe9", "label": 0, "uid": "z", "answer": "x"}\n', 201),
    ("csv", b"caf\xe9,0,z,x\n", 202),  # the header is line 1
    ("text", b"caf\xe9 au lait\n", 201),
])
def test_a_bad_byte_deep_in_a_data_file_is_named_by_its_line(tmp_path, builder, body, line):
    """datasets decodes in blocks: its offset ("at byte 3") counts from the block, not the file."""
    data = tmp_path / f"data.{builder}"
    data.write_bytes(rows(builder, 200, body))
    task = load_task(write_task(tmp_path, "text_modelling", dataset_path=builder, data_files=data.name))
    with pytest.raises(TaskError) as exc:
        read_records(task)
    assert str(data) in one_line(exc) and f"at line {line}, byte " in str(exc.value), str(exc.value)


@pytest.mark.parametrize("builder, body", [
    ("json", b""), ("json", b"\n\n  \n"), ("csv", b""), ("text", b""), ("text", b" \n\n"), ("parquet", b""),
])
def test_an_empty_data_file_is_one_line_saying_so(tmp_path, builder, body):
    """Not "StopIteration", "SchemaInferenceError" or "EmptyDataError": the file is named, and said to be empty."""
    data = tmp_path / f"data.{builder}"
    data.write_bytes(body)
    task = load_task(write_task(tmp_path, "text_modelling", dataset_path=builder, data_files=data.name))
    with pytest.raises(TaskError) as exc:
        read_records(task)
    assert f"data file {data} is empty" in one_line(exc)


@pytest.mark.parametrize("body", [b"sentence,label,uid,answer\n", b"[]\n"])
def test_a_data_file_without_records_is_one_line_saying_so(tmp_path, body):
    """A CSV header alone, a JSON empty list: not "Instruction 'train' corresponds to no data"."""
    builder = "csv" if body.startswith(b"sentence") else "json"
    data = tmp_path / f"data.{builder}"
    data.write_bytes(body)
    task = load_task(write_task(tmp_path, "text_modelling", dataset_path=builder, data_files=data.name))
    with pytest.raises(TaskError) as exc:
        read_records(task)
    assert f"data file {data} holds no records" in one_line(exc)


def test_a_full_temporary_folder_is_named_as_full(tmp_path):
    """datasets prepares the records as an Arrow file in the temporary folder: where that cannot be written
    (full; here a file-size limit, as `ulimit -f` sets), the line names the folder and TMPDIR, not the data file."""
    data = tmp_path / "data.json"
    data.write_bytes(rows("json", 3000))  # ~60 KB of Arrow
    task = write_task(tmp_path, "text_modelling", data_files=data.name)
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    code = ("import resource, sys\n"
            "from sieve_cli.errors import TaskError\n"
            "from sieve_cli.tasks import load_task, read_records\n"
            "task = load_task(sys.argv[1])\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))\n"
            "try:\n    read_records(task)\nexcept TaskError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code, str(task)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "TMPDIR": str(temporary)}, timeout=120)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert f"the temporary folder {temporary} is full" in line and "TMPDIR" in line, line
    assert "could not read data file" not in line
    assert not list(temporary.iterdir())  # datasets' half-written cache is gone too


def test_data_files_pointing_at_a_folder_says_so(tmp_path):
    (tmp_path / "folder").mkdir()
    task = load_task(write_task(tmp_path, "text_modelling", data_files="folder"))
    with pytest.raises(TaskError, match="is a folder") as exc:
        read_records(task)
    one_line(exc)


# ---- few-shot leakage ---------------------------------------------------------------------------------


def write_unique_records(folder: Path, n: int = 40) -> Path:
    """Records whose sentences are all distinct, so 'its own text' is unambiguous."""
    path = folder / "unique.jsonl"
    path.write_text("".join(json.dumps({"sentence": f"sentence number {i}", "label": i % 2}) + "\n" for i in range(n)))
    return path


@pytest.mark.parametrize("files, fewshot_split", [
    ({"test": "unique.jsonl"}, "test"),  # fewshot_split equal to the evaluated split
    ("unique.jsonl", "train"),  # one data file: every split name reads it
])
def test_no_prompt_holds_its_own_text_or_another_scored_example(tmp_path, files, fewshot_split):
    write_unique_records(tmp_path)
    task = write_task(tmp_path, "multiple_choice", data_files=files, split="test", fewshot_split=fewshot_split,
                      num_fewshot=12, id_field=None)
    bound = bind_task(Workspace(tmp_path / "ws"), task, split=SplitOptions(search=8, test=12, confirm=0.15))
    scored = {e.id: e for part in ("search", "test") for e in bound.examples(part)}
    for example in bound.examples("test"):
        own = example.context.rsplit("\n\n", 1)[0]  # the demonstrations, without the question itself
        assert example.context.count("\n\n") == 12
        assert f"{bound.records[example.id]['sentence']}\n" not in own
        for other in scored.values():  # nor any other search or test example with its answer
            assert f"Q: {bound.records[other.id]['sentence']}\nA: {other.target}" not in own
    assert bound.split["fewshot_from"] == "calibration"


# ---- labels and ids --------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["label", "{{ label }}"])
def test_integer_label_is_an_index_into_the_choices(tmp_path, target):
    data = tmp_path / "digits.jsonl"
    data.write_text("".join(json.dumps({"q": f"question {i}", "label": i % 4}) + "\n" for i in range(40)))
    task = write_task(tmp_path, "multiple_choice", data_files=data.name, id_field="q", doc_to_text="{{ q }}",
                      doc_to_target=target, doc_to_choice=["1", "2", "3", "4"])
    bound = bind_task(Workspace(tmp_path / "ws"), task, split=SplitOptions(search=4, test=8))
    for example in bound.examples("test"):
        label = int(example.context.split()[-1]) % 4
        assert (example.gold, example.target) == (label, str(label + 1))


def test_ids_are_content_stable_and_changed_data_is_refused(tmp_path):
    data = write_unique_records(tmp_path)
    task = write_task(tmp_path, "multiple_choice", data_files=data.name, id_field=None)
    ws = Workspace(tmp_path / "ws")
    bound = bind_task(ws, task, split=SplitOptions(search=8, test=12))
    before = {i: bound.records[i] for i in bound.ids("test")}
    data.write_text(json.dumps({"sentence": "a new first row", "label": 1}) + "\n" + data.read_text())
    after = read_records(load_task(task))
    from sieve_cli.tasks import record_ids

    ids_after = dict(zip(record_ids(load_task(task), after), after))
    assert all(ids_after[i] == rec for i, rec in before.items())  # same id, same example
    with pytest.raises(TaskError, match="data changed since the task was bound") as exc:
        load_bound_task(ws)
    assert "--force" in one_line(exc) and str(data) in str(exc.value)
    rebound = bind_task(ws, task, force=True, split=SplitOptions(search=8, test=12))
    assert len(rebound.records) == 41 and load_bound_task(ws).ids("test") == rebound.ids("test")


def test_exact_duplicates_get_distinct_ids():
    from sieve_cli.tasks import content_ids

    ids = content_ids([{"a": 1}, {"a": 2}, {"a": 1}, {"a": 1}])
    assert len(set(ids)) == 4 and ids[2] == f"{ids[0]}~2" and ids[3] == f"{ids[0]}~3"
    assert content_ids([{"b": 0}, {"a": 1}])[1] == ids[0]  # a row's id does not depend on its position
