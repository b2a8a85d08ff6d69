"""The built-in tasks: the generated reviews (deterministic, balanced, one sentiment each) and their binding."""

import re

from typer.testing import CliRunner

from sieve_cli.builtin_tasks.reviews import ADJECTIVES, LABELS, VERDICTS, review_records
from sieve_cli.cli import app
from sieve_cli.tasks import BUILTIN_TASKS, DEFAULT_TASK, bind_task, load_task, read_records
from sieve_cli.workspace import Workspace


def test_reviews_are_reproducible_distinct_and_balanced():
    records = review_records(count=400, seed=3)
    assert records == review_records(count=400, seed=3)  # same arguments, same data (the split hashes it)
    assert records != review_records(count=400, seed=4)
    assert len({r["text"] for r in records}) == len({r["id"] for r in records}) == 400
    assert sum(r["label"] for r in records) == 200


def sentiment_words(text: str) -> set[str]:
    """The labels whose adjectives or verdicts occur in `text` (whole words, any case)."""
    found = set()
    words = set(re.findall(r"[a-z]+", text.lower()))
    for label in LABELS:
        if words & set(ADJECTIVES[label]):
            found.add(label)
        for verdict in VERDICTS[label]:
            pattern = re.escape(verdict.lower()).replace(re.escape("{thing}"), r"\w+")
            if re.search(pattern, text.lower()):
                found.add(label)
    return found


def test_every_review_carries_only_its_own_sentiment():
    for r in review_records(count=1000, seed=0):
        assert sentiment_words(r["text"]) == {LABELS[r["label"]]}, r


def test_default_task_is_the_reviews_and_binds_without_data(tmp_path, monkeypatch):
    monkeypatch.delenv("SIEVE_DATA_ROOT", raising=False)
    assert DEFAULT_TASK == BUILTIN_TASKS["reviews"] and list(BUILTIN_TASKS)[0] == "reviews"
    task = load_task(DEFAULT_TASK)
    assert read_records(task) == review_records(**task.dataset_kwargs)
    bound = bind_task(Workspace(tmp_path / "ws"), DEFAULT_TASK)
    assert bound.output_type == "multiple_choice"
    counts = bound.split["counts"]
    assert sum(counts.values()) == len(bound.records) >= 400 and min(counts.values()) >= 100
    example = bound.examples("test")[0]
    record = bound.records[example.id]
    assert example.context == f"Review: {record['text']}\nSentiment:"
    assert example.choices == ("negative", "positive") and example.gold == record["label"]


def test_every_builtin_task_file_loads():
    for name, path in BUILTIN_TASKS.items():
        assert load_task(path).name == name


def test_demo_refuses_an_unknown_task_in_one_line():
    result = CliRunner().invoke(app, ["demo", "--builtin", "sst3"])
    assert result.exit_code == 1
    assert "--builtin must be one of reviews, python_stdlib" in " ".join(result.output.split())
