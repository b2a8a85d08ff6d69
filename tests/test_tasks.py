"""Task files, data loading, splits and stage `task` (bind_task)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sieve_cli.errors import InputError, MissingStageError, StaleStageError, TaskError
from sieve_cli.tasks import (
    STDLIB_TASK,
    SplitOptions,
    bind_task,
    load_bound_task,
    load_task,
    make_split,
    read_records,
    stdlib_records,
)
from sieve_cli.workspace import Workspace

# ---- helpers shared with test_evaluate.py ------------------------------------------------------

WORDS = ["red", "green", "blue", "apple", "pear", "dog", "cat", "sun", "moon", "tree"]


def write_records(folder: Path, n: int = 24) -> Path:
    """n JSON Lines records with a sentence, a label 0/1 and an answer; deterministic."""
    path = folder / "data.jsonl"
    rows = []
    for i in range(n):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(1 + i % 5)]
        rows.append({"uid": f"r{i}", "sentence": " ".join(words), "label": i % 2, "answer": words[-1] + "!"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_task(folder: Path, output_type: str, **overrides) -> Path:
    write_records(folder)
    body = {
        "multiple_choice": {
            "doc_to_text": "Q: {{ sentence }}\nA:",
            "doc_to_target": "label",
            "doc_to_choice": ["no", "yes way"],
        },
        "text_modelling": {"doc_to_text": "Say: {{ sentence }}", "doc_to_target": "{{ answer }} {{ sentence }}"},
        "generate_until": {
            "doc_to_text": "Q: {{ sentence }}\nA:",
            "doc_to_target": "{{ answer }}",
            "generation_kwargs": {"until": ["\n", "."], "max_gen_toks": 6},
        },
    }[output_type]
    task = {"task": f"tiny_{output_type}", "dataset_path": "json", "data_files": "data.jsonl", "id_field": "uid",
            "output_type": output_type, **body, **overrides}
    path = folder / f"{output_type}.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False))
    return path


def bind(tmp_path: Path, output_type: str = "multiple_choice", split: SplitOptions | None = None, **overrides):
    task = write_task(tmp_path, output_type, **overrides)
    return bind_task(Workspace(tmp_path / "ws"), task, split=split or SplitOptions(search=4, test=8)), task


# ---- the task file ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda t: t.pop("output_type"), "'output_type' is missing"),
        (lambda t: t.update(output_type="loglikelihood"), "'output_type' is 'loglikelihood'"),
        (lambda t: t.pop("doc_to_choice"), "'doc_to_choice' is missing"),
        (lambda t: t.update(doc_to_txt="x"), "unknown field 'doc_to_txt'"),
        (lambda t: t.update(num_fewshot=-1), "'num_fewshot'"),
        (lambda t: t.update(generation_kwargs={"until": 3}), "'generation_kwargs.until'"),
        (lambda t: t.update(data_files={"a": "x.jsonl"}), "'split' is missing"),
    ],
)
def test_malformed_task_names_the_field(tmp_path, change, field):
    path = write_task(tmp_path, "multiple_choice")
    raw = yaml.safe_load(path.read_text())
    change(raw)
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(TaskError, match=field.replace("(", r"\(")):
        load_task(path)


def test_template_errors_name_the_field_and_the_record_fields(tmp_path):
    with pytest.raises(TaskError, match=r"'doc_to_text'.*sentense.*sentence"):
        bind(tmp_path, doc_to_text="Q: {{ sentense }}")
    assert not Workspace(tmp_path / "ws").manifest_path("task").exists()  # caught before anything is recorded
    # fails only on later records whose sentence is one word: found when they are rendered
    bound, _ = bind(tmp_path, doc_to_text="Q: {{ sentence if uid == 'r0' else sentence.split()[1] }}")
    with pytest.raises(TaskError, match=r"'doc_to_text'.*no element 1"):
        [bound.examples(part) for part in ("calibration", "search", "test")]


def test_not_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed")
    with pytest.raises(TaskError, match="not valid YAML"):
        load_task(bad)
    with pytest.raises(InputError, match="no such task file"):
        load_task(tmp_path / "none.yaml")


def test_relative_paths_resolve_against_the_task_folder(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    task = load_task(write_task(tmp_path, "multiple_choice"))
    assert task.data_files == str(tmp_path.resolve() / "data.jsonl")


def test_data_root_from_argument_env_and_missing(tmp_path, monkeypatch):
    data = tmp_path / "mydata" / "tiny"
    data.mkdir(parents=True)
    write_records(data)
    folder = tmp_path / "tasks"
    folder.mkdir()
    path = write_task(folder, "multiple_choice", data_files="{data_root}/tiny/data.jsonl")
    monkeypatch.delenv("SIEVE_DATA_ROOT", raising=False)
    assert load_task(path, data_root=tmp_path / "mydata").data_files == str(data / "data.jsonl")
    monkeypatch.setenv("SIEVE_DATA_ROOT", str(tmp_path / "mydata"))
    task = load_task(path)
    assert task.data_files == str(data / "data.jsonl") and task.data_root == str(tmp_path / "mydata")
    monkeypatch.delenv("SIEVE_DATA_ROOT")
    if not any((p / "shared" / "data").is_dir() for p in folder.resolve().parents):
        with pytest.raises(TaskError, match="SIEVE_DATA_ROOT"):
            load_task(path)


# ---- splits -----------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_sized():
    ids = [f"id{i}" for i in range(1000)]
    a = make_split(ids, SplitOptions(seed=3))
    assert a == make_split(ids, SplitOptions(seed=3))
    assert a != make_split(ids, SplitOptions(seed=4))
    # test 25% (cap 300), confirm 30% (cap 400), search 25% capped 250 -> 200, calibration the rest
    assert [len(a[p]) for p in ("calibration", "search", "confirm", "test")] == [250, 200, 300, 250]
    sets = [set(v) for v in a.values()]
    assert sum(map(len, sets)) == len(set().union(*sets)) == 1000
    small = make_split(ids[:50], SplitOptions(search=0.2, test=10, calibration=5))
    assert [len(small[p]) for p in ("calibration", "search", "test")] == [5, 10, 10]
    assert set(small["test"]) == set(make_split(ids[:50], SplitOptions(search=3, test=10, calibration=5))["test"])


def test_split_that_does_not_fit_is_an_error():
    with pytest.raises(TaskError, match="cannot split 10 examples"):
        make_split([str(i) for i in range(10)], SplitOptions(search=5, test=5))
    with pytest.raises(InputError, match="--search"):
        SplitOptions(search=0)


# ---- binding ----------------------------------------------------------------------------------


def test_bind_writes_copy_split_and_manifest(tmp_path):
    bound, task_path = bind(tmp_path, num_fewshot=2)
    ws = Workspace(tmp_path / "ws")
    split = json.loads(ws.split_json.read_text())
    assert split["counts"] == {"calibration": 5, "search": 4, "confirm": 7, "test": 8}
    parts = [set(split["ids"][p]) for p in ("calibration", "search", "confirm", "test")]
    assert sum(map(len, parts)) == len(set().union(*parts)) == 24  # disjoint
    # few-shot demonstrations only ever come from calibration
    assert len(split["fewshot"]) == 3 and set(split["fewshot"]) <= parts[0]
    copy = yaml.safe_load(ws.task_yaml.read_text())
    assert Path(copy["data_files"]).is_absolute() and copy["sieve"]["source"] == str(task_path.resolve())
    manifest = ws.read_manifest("task")
    assert manifest["complete"] and manifest["summary"]["test"] == 8
    assert ws.upstream_hashes("task")["task"] == ws.manifest_hash("task")


def test_texts_and_examples_hold_context_delimiter_and_gold(tmp_path):
    bound, _ = bind(tmp_path)
    records = {json.loads(l)["uid"]: json.loads(l) for l in (tmp_path / "data.jsonl").read_text().splitlines()}
    for example, text in zip(bound.examples("test"), bound.texts("test")):
        rec = records[example.id]
        gold = ["no", "yes way"][rec["label"]]
        assert example.choices == ("no", "yes way") and example.gold == rec["label"]
        assert text == f"Q: {rec['sentence']}\nA: {gold}"
    ids = bound.ids("calibration")
    assert [e.id for e in bound.examples("calibration")] == ids


def test_fewshot_context_excludes_the_example_itself(tmp_path):
    bound, _ = bind(tmp_path, num_fewshot=2)
    shots = bound.split["fewshot"]
    for example in bound.examples("calibration"):
        assert example.context.count("\n\n") == 2  # two demonstrations, then the question
    first = bound.examples("calibration")[bound.ids("calibration").index(shots[0])]
    rec = bound.records[shots[0]]
    assert not first.context.startswith(f"Q: {rec['sentence']}\nA:") or rec["sentence"] in first.context.split("\n\n")[-1]


def test_rebind_unchanged_is_noop_changed_is_stale_force_replaces(tmp_path):
    bound, task_path = bind(tmp_path)
    ws = Workspace(tmp_path / "ws")
    written = ws.read_manifest("task")["written"]
    again = bind_task(ws, task_path, split=SplitOptions(search=4, test=8))
    assert again.split == bound.split and ws.read_manifest("task")["written"] == written
    with pytest.raises(StaleStageError, match="--force"):
        bind_task(ws, task_path, split=SplitOptions(search=4, test=8, seed=1))
    raw = yaml.safe_load(task_path.read_text())
    raw["doc_to_text"] = "Question: {{ sentence }}\nA:"
    task_path.write_text(yaml.safe_dump(raw))
    with pytest.raises(StaleStageError):
        bind_task(ws, task_path, split=SplitOptions(search=4, test=8))
    rebound = bind_task(ws, task_path, force=True, split=SplitOptions(search=4, test=8, seed=1))
    assert rebound.split["ids"] != bound.split["ids"]
    assert bind_task(ws, None).examples("test")[0].context.startswith("Question:")


def test_bound_task_survives_moving_the_task_file(tmp_path):
    bound, task_path = bind(tmp_path)
    task_path.rename(tmp_path / "moved.yaml")
    reloaded = load_bound_task(Workspace(tmp_path / "ws"))
    assert reloaded.texts("test") == bound.texts("test")


def test_no_task_bound_names_the_flag(tmp_path):
    with pytest.raises(MissingStageError, match="--task"):
        bind_task(Workspace(tmp_path / "ws"), None)


# ---- the built-in and example tasks --------------------------------------------------------------


def test_stdlib_task_is_split_by_file(tmp_path):
    records = stdlib_records()
    paths = [r["path"] for r in records]
    assert len(records) > 200 and "os.py" in paths and len(set(paths)) == len(paths)
    assert not any("/test/" in f"/{p}" or p.split("/")[-1].startswith("test_") for p in paths)
    assert all(200 <= len(r["text"]) <= 1200 for r in records)
    bound = bind_task(Workspace(tmp_path / "ws"), STDLIB_TASK)
    assert bound.output_type == "text_modelling"
    assert set(bound.ids("test")) <= set(paths) and bound.split["counts"]["search"] == min(200, round(0.25 * len(records)))
    assert bound.texts("search")[0] == bound.records[bound.ids("search")[0]]["text"]


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "tasks"
EXPECTED = {
    "sst2": ("multiple_choice", 872, ("negative", "positive")),
    "trec": ("multiple_choice", 500, ("abbreviation", "description", "entity", "person", "location", "number")),
    "pubmedqa": ("multiple_choice", 1000, ("yes", "no", "maybe")),
    "mbpp": ("text_modelling", 974, ()),
    "humaneval": ("text_modelling", 164, ()),
    "gsm8k": ("text_modelling", 1319, ()),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_tasks_bind_on_the_shared_data(name, data_root, tmp_path):
    output_type, rows, choices = EXPECTED[name]
    bound = bind_task(Workspace(tmp_path / "ws"), EXAMPLES / f"{name}.yaml", data_root=data_root)
    assert bound.output_type == output_type and len(bound.records) == rows
    counts = bound.split["counts"]
    if bound.split["calibration_from"]:  # gsm8k: calibration from train, the rest of test joins confirm
        assert counts["calibration"] > 1000 and counts["confirm"] == 400 and sum(counts.values()) - counts[
            "calibration"] < rows
    else:
        assert sum(counts.values()) == rows
    examples = bound.examples("test")
    assert all(e.choices == choices for e in examples)
    assert all(e.target and "\r" not in e.target for e in examples)
    if choices:  # every label is used, so the label mapping is not stuck on one class
        assert len({e.gold for e in bound.examples("calibration")}) == len(choices)


def test_rebinding_the_same_task_keeps_its_split_sizes(tmp_path):
    task = write_task(tmp_path, "multiple_choice")
    ws = Workspace(tmp_path / "ws")
    first = bind_task(ws, task, split=SplitOptions(search=3, test=5))
    again = bind_task(ws, task)  # e.g. `sieve capture --task T` after `sieve eval --task T --search-size 3`
    assert again.split["ids"] == first.split["ids"] and len(again.ids("search")) == 3


# ---- local data through datasets' builders ---------------------------------------------------------


def headerless_task(tmp_path: Path, **kwargs) -> Path:
    (tmp_path / "rows.tsv").write_text("".join(f"row {i} text\t{i % 2}\n" for i in range(30)))
    return write_task(tmp_path, "multiple_choice", dataset_path="csv", data_files="rows.tsv", id_field=None,
                      doc_to_text="{{ sentence }}", dataset_kwargs={"delimiter": "\t", **kwargs})


def test_csv_without_header_reads_every_row_with_column_names(tmp_path):
    task = load_task(headerless_task(tmp_path, column_names=["sentence", "label"]))
    records = read_records(task)
    assert records == [{"sentence": f"row {i} text", "label": i % 2} for i in range(30)]  # row 0 is data, not a header


def test_unknown_dataset_kwarg_is_one_line(tmp_path):
    task = load_task(headerless_task(tmp_path, colum_names=["sentence", "label"]))
    with pytest.raises(TaskError, match="'colum_names'") as exc:
        read_records(task)
    assert "\n" not in str(exc.value)


def test_local_builders_read_offline_and_leave_no_files(tmp_path, monkeypatch):
    import socket
    import tempfile

    import datasets

    def refuse(*args, **kwargs):
        raise AssertionError("reading local task data opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    hf_cache = Path(datasets.config.HF_DATASETS_CACHE)
    cache_before = sorted(hf_cache.rglob("*")) if hf_cache.exists() else []
    temp_before = set(Path(tempfile.gettempdir()).glob("sieve-datasets-*"))
    rows = [{"sentence": f"s{i}", "label": i % 2} for i in range(6)]
    import pandas as pd

    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "d.txt").write_text("".join(f"s{i}\n\n" for i in range(6)))  # blank lines are no records
    (tmp_path / "keyed.json").write_text(json.dumps({f"k{i}": r for i, r in enumerate(rows)}))
    expect = {"parquet": rows, "csv": rows, "text": [{"text": f"s{i}"} for i in range(6)],
              "json": [{"id": f"k{i}", **r} for i, r in enumerate(rows)]}
    for builder, name in [("parquet", "d.parquet"), ("csv", "d.csv"), ("text", "d.txt"), ("json", "keyed.json")]:
        task = load_task(write_task(tmp_path, "text_modelling", dataset_path=builder, data_files=name))
        assert read_records(task) == expect[builder], builder
    assert (sorted(hf_cache.rglob("*")) if hf_cache.exists() else []) == cache_before
    assert set(Path(tempfile.gettempdir()).glob("sieve-datasets-*")) == temp_before


# ---- few-shot samplers ---------------------------------------------------------------------------------


def sampler_task(tmp_path: Path, sampler: str | None, k: int = 4) -> Path:
    """Examples in test.jsonl, demonstrations from train.jsonl: 30 rows, 3 classes in runs of 10."""
    for name in ("test", "train"):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps({"sentence": f"{name} {i}", "label": i // 10}) + "\n" for i in range(30)))
    extra = {"fewshot_config": {"sampler": sampler}} if sampler else {}
    return write_task(tmp_path, "multiple_choice", data_files={"test": "test.jsonl", "train": "train.jsonl"},
                      split="test", fewshot_split="train", num_fewshot=k, id_field=None,
                      doc_to_choice=["a", "b", "c"], **extra)


def demonstrated(bound) -> list[str]:
    example = bound.examples("test")[0]
    return [shot.split("\n")[0].removeprefix("Q: ") for shot in example.context.split("\n\n")[:-1]]


def test_first_n_sampler_takes_the_first_rows_in_file_order(tmp_path):
    bound = bind_task(Workspace(tmp_path / "ws"), sampler_task(tmp_path, "first_n"), split=SplitOptions(search=4, test=8))
    assert demonstrated(bound) == [f"train {i}" for i in range(4)]
    assert bound.split["fewshot_sampler"] == "first_n" and bound.split["fewshot_from"] == "split:train"


def test_balanced_sampler_cycles_through_the_classes(tmp_path):
    bound = bind_task(Workspace(tmp_path / "ws"), sampler_task(tmp_path, "balanced", k=5), split=SplitOptions(search=4, test=8))
    labels = [int(s.split()[1]) // 10 for s in demonstrated(bound)]
    assert labels == [0, 1, 2, 0, 1]


def test_default_sampler_is_recorded_and_draws_at_random(tmp_path):
    bound = bind_task(Workspace(tmp_path / "ws"), sampler_task(tmp_path, None), split=SplitOptions(search=4, test=8))
    assert bound.split["fewshot_sampler"] == "default" and len(bound.split["fewshot"]) == 5
    assert demonstrated(bound) != [f"train {i}" for i in range(4)]  # not simply the first rows
    assert all(s.startswith("train ") for s in demonstrated(bound))


@pytest.mark.parametrize("config, message", [
    ({"sampler": "stratified"}, "'fewshot_config.sampler' is 'stratified'"),
    ({"sampler": "first_n", "samples": 3}, "'fewshot_config' must be a mapping with one key"),
])
def test_bad_fewshot_config_names_the_field(tmp_path, config, message):
    path = write_task(tmp_path, "multiple_choice", fewshot_config=config)
    with pytest.raises(TaskError, match=message):
        load_task(path)
    with pytest.raises(TaskError, match="balanced needs output_type multiple_choice"):
        load_task(write_task(tmp_path, "text_modelling", fewshot_config={"sampler": "balanced"}))


# ---- calibration from another split ------------------------------------------------------------------


def calibration_task(tmp_path: Path, fewshot: bool = True, **overrides) -> Path:
    """30 examples in test.jsonl; 50 training rows in calib.jsonl, two of them copies of test rows;
    demonstrations from train.jsonl (or, without fewshot_split, from calibration)."""
    test = [{"sentence": f"test {i}", "label": i % 3} for i in range(30)]
    calib = [{"sentence": f"calib {i}", "label": i % 3} for i in range(48)] + [test[3], test[7]]
    train = [{"sentence": f"train {i}", "label": i % 3} for i in range(10)]
    for name, rows in (("test", test), ("calib", calib), ("train", train)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = {"fewshot_split": "train"} if fewshot else {}
    overrides = {"calibration_split": "calib", **overrides}
    return write_task(tmp_path, "multiple_choice", id_field=None, split="test",
                      data_files={"test": "test.jsonl", "calib": "calib.jsonl", "train": "train.jsonl"},
                      num_fewshot=2, doc_to_choice=["a", "b", "c"], **extra, **overrides)


def sentences(bound, part: str) -> list[str]:
    return [e.context.split("\n\n")[-1].split("\n")[0].removeprefix("Q: ") for e in bound.examples(part)]


def test_calibration_split_calibrates_on_training_rows_and_gives_the_evaluated_split_to_the_other_parts(tmp_path):
    bound = bind_task(Workspace(tmp_path / "ws"), calibration_task(tmp_path),
                      split=SplitOptions(search=8, test=10, confirm=5))
    calibration = sentences(bound, "calibration")
    # every calibration row comes from calib.jsonl, in a shuffled order, and never a copy of an evaluated row
    assert sorted(calibration) == sorted(f"calib {i}" for i in range(48))
    assert calibration != [f"calib {i}" for i in range(48)]
    evaluated = [s for part in ("search", "confirm", "test") for s in sentences(bound, part)]
    # all 30 evaluated examples are used: the 7 left after test and search join confirm
    assert sorted(evaluated) == sorted(f"test {i}" for i in range(30))
    assert bound.split["counts"] == {"test": 10, "confirm": 12, "search": 8, "calibration": 48}
    assert bound.split["calibration_from"] == "split:calib" and bound.split["fewshot_from"] == "split:train"
    # reloaded from the workspace, the same examples come back
    again = load_bound_task(Workspace(tmp_path / "ws"))
    assert sentences(again, "calibration") == calibration and sentences(again, "test") == sentences(bound, "test")


def test_calibration_size_takes_part_of_the_calibration_split_and_demonstrations_come_from_it(tmp_path):
    bound = bind_task(Workspace(tmp_path / "ws"), calibration_task(tmp_path, fewshot=False),
                      split=SplitOptions(search=8, test=10, confirm=5, calibration=20))
    assert len(bound.ids("calibration")) == 20 and bound.split["fewshot_from"] == "split:calib"
    for example in bound.examples("test"):
        shots = [s.split("\n")[0].removeprefix("Q: ") for s in example.context.split("\n\n")[:-1]]
        assert len(shots) == 2 and all(s.startswith("calib ") for s in shots)


def test_a_changed_calibration_file_is_caught(tmp_path):
    task = calibration_task(tmp_path)
    bind_task(Workspace(tmp_path / "ws"), task, split=SplitOptions(search=8, test=10, confirm=5))
    with (tmp_path / "calib.jsonl").open("a") as f:
        f.write(json.dumps({"sentence": "late", "label": 0}) + "\n")
    with pytest.raises(TaskError, match="data changed"):
        load_bound_task(Workspace(tmp_path / "ws"))


def test_a_calibration_split_that_only_repeats_evaluated_examples_is_refused(tmp_path):
    task = calibration_task(tmp_path)
    (tmp_path / "calib.jsonl").write_text((tmp_path / "test.jsonl").read_text())
    with pytest.raises(TaskError, match="holds no record that is not also an evaluated example"):
        bind_task(Workspace(tmp_path / "ws"), task, split=SplitOptions(search=8, test=10, confirm=5))


def test_calibration_split_must_name_a_data_files_split(tmp_path):
    path = calibration_task(tmp_path, calibration_split="nope")
    with pytest.raises(TaskError, match="'calibration_split' is 'nope'.*test, calib, train"):
        load_task(path)
    flat = write_task(tmp_path, "multiple_choice", calibration_split="calib")
    with pytest.raises(TaskError, match="calibration_split.*mapping"):
        load_task(flat)
