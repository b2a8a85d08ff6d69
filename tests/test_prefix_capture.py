"""Shared-prefix capture: a prompt prefix runs once and counts once per example after it.

The reference is every full sequence (prefix + own tokens) run alone with plain hooks, every
token counted, summed in float64: the statistics with the prefix shared must equal it, in
memory and block by block, on tiny models with rotary (llama, gemma 3 with a sliding window)
and absolute (gpt2) positions.
"""


import pytest
import torch

from sieve_cli.blockwise import capture_and_fit, open_runner
from sieve_cli.calibration import NO_PREFIX, Calibration, build_calibration
from sieve_cli.capture import CaptureOptions, capture_statistics
from sieve_cli.fit import FitOptions, fit_site
from sieve_cli.matrices import find_matrices, sites_of
from sieve_cli.models import load_model
from sieve_cli.store import read_stats

from .test_capture import recorded_inputs
from .tiny import BLOCK_FAMILIES, tiny_tokenizer

FAMILIES = BLOCK_FAMILIES
OPTIONS = CaptureOptions(batch_size=3, chunk_tokens=40, samples_per_site=8)


def make_calibration(seed=0) -> Calibration:
    """Two prefixes (20 and 18 tokens: past gemma 3's window of 16) and some sequences after none,
    interleaved so the second prefix is first used in a later chunk."""
    g = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(3, 100, (n,), generator=g).tolist()

    prefixes = [tuple(tokens(20)), tuple(tokens(18))]
    layout = [(0, 5), (0, 9), (NO_PREFIX, 7), (0, 3), (0, 12), (1, 4), (NO_PREFIX, 11), (0, 6), (1, 8), (1, 2), (0, 1)]
    return Calibration([tokens(n) for _, n in layout], [p for p, _ in layout], prefixes, examples=len(layout))


def reference_grams(model, calibration: Calibration) -> dict:
    """float64 x^T x of every full sequence run alone, every token counted."""
    recorded = recorded_inputs(model, calibration.full_sequences())
    return {site: (lambda x: x.T @ x)(recorded[group[0].name].double()) for site, group in sites_of(find_matrices(model)).items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefix_grams_equal_every_full_sequence_in_memory_and_blockwise(folders, family, tmp_path):
    model, _ = load_model(str(folders[family]), "float32", "cpu")
    calibration = make_calibration()
    full = sum(map(len, calibration.full_sequences()))
    reference = reference_grams(model, calibration)

    summary = capture_statistics(model, calibration, OPTIONS, tmp_path / "memory.zarr")
    memory = read_stats(tmp_path / "memory.zarr")
    assert summary["tokens"] == full and summary["tokens_this_run"] == calibration.tokens_run < full
    for site, gram in reference.items():
        assert memory[site].tokens == full
        torch.testing.assert_close(memory[site].gram, gram, rtol=1e-5, atol=1e-5)

    runner = open_runner(folders[family], torch.float32, "cpu")
    result = capture_and_fit(runner, calibration, OPTIONS, [FitOptions()], tmp_path / "work", fit_site, store=tmp_path / "block.zarr")
    assert result.summary["tokens"] == full and result.summary["tokens_this_run"] == calibration.tokens_run
    blockwise = read_stats(tmp_path / "block.zarr")
    for site in reference:
        # the same block calls as the full forward: equal to the in-memory statistics, samples bitwise
        torch.testing.assert_close(blockwise[site].gram, memory[site].gram, rtol=1e-10, atol=1e-10)
        assert torch.equal(blockwise[site].samples, memory[site].samples) and blockwise[site].tokens == full


def test_prefix_rows_enter_the_reservoir_as_often_as_the_stream_repeats_them(folders, tmp_path):
    """With room for every counted row, the sample holds each prefix row once per example after it."""
    model, _ = load_model(str(folders["llama"]), "float32", "cpu")
    calibration = make_calibration()
    options = CaptureOptions(batch_size=3, chunk_tokens=40, samples_per_site=calibration.tokens_counted)
    capture_statistics(model, calibration, options, tmp_path / "s.zarr")
    site, group = next(iter(sites_of(find_matrices(model)).items()))
    sample = read_stats(tmp_path / "s.zarr")[site].samples.float()
    reference = recorded_inputs(model, calibration.full_sequences())[group[0].name].half().float()
    assert sample.shape == reference.shape
    # the same multiset of rows: sort both by their row sums, then compare
    order = lambda x: x[torch.argsort(x.sum(1) * 1e3 + x[:, 0])]  # noqa: E731
    torch.testing.assert_close(order(sample), order(reference), atol=2e-2, rtol=1e-2)


def test_killed_capture_resumes_with_prefix_caches_rebuilt(folders, tmp_path):
    """A resumed capture whose later chunks run after a prefix counted in an earlier chunk."""
    model, _ = load_model(str(folders["gpt2"]), "float32", "cpu")
    calibration = make_calibration(1)
    capture_statistics(model, calibration, OPTIONS, tmp_path / "whole.zarr")

    class Killed(Exception):
        pass

    def kill(chunk):
        if chunk == 0:
            raise Killed

    with pytest.raises(Killed):
        capture_statistics(model, calibration, OPTIONS, tmp_path / "cut.zarr", after_chunk=kill)
    summary = capture_statistics(model, calibration, OPTIONS, tmp_path / "cut.zarr")
    assert summary["resumed_from_chunk"] == 1 and summary["chunks"] > 2
    whole, resumed = read_stats(tmp_path / "whole.zarr"), read_stats(tmp_path / "cut.zarr")
    for site in whole:
        assert torch.equal(whole[site].gram, resumed[site].gram) and torch.equal(whole[site].samples, resumed[site].samples)


@pytest.mark.parametrize("tier", ["device", "disk"])
def test_killed_blockwise_run_resumes_with_prefix_caches_rebuilt(folders, tmp_path, tier):
    runner = open_runner(folders["llama"], torch.float32, "cpu")
    calibration = make_calibration(2)
    capture_and_fit(runner, calibration, OPTIONS, [FitOptions()], tmp_path / "whole", fit_site, tier=tier, store=tmp_path / "w.zarr")

    class Killed(Exception):
        pass

    def kill(index):
        if index == 0:
            raise Killed

    with pytest.raises(Killed):
        capture_and_fit(runner, calibration, OPTIONS, [FitOptions()], tmp_path / "cut", fit_site, tier=tier,
                        store=tmp_path / "c.zarr", after_block=kill)
    resumed = capture_and_fit(runner, calibration, OPTIONS, [FitOptions()], tmp_path / "cut", fit_site, tier=tier,
                              store=tmp_path / "c.zarr")
    assert resumed.summary["resumed_from_block"] == 1
    whole, cut = read_stats(tmp_path / "w.zarr"), read_stats(tmp_path / "c.zarr")
    for site in whole:
        assert torch.equal(whole[site].gram, cut[site].gram) and torch.equal(whole[site].samples, cut[site].samples)


# ---- building the stream from rendered examples ------------------------------------------------

SHOTS = "Review: a fine film\nSentiment: positive\n\nReview: dull\nSentiment: negative\n\n"  # 70 characters


def examples(questions, shared=SHOTS):
    return [(shared, f"{shared}Review: {q}\nSentiment: positive") for q in questions]


def test_one_prefix_per_prompt_group_counted_once_per_example():
    tokenizer = tiny_tokenizer()  # one token per character: lengths are the texts' lengths
    other = "Classify.\n\nReview: ok\nSentiment: positive\n\n"
    items = examples(["great", "bad", "fine plot"]) + examples(["so so"], other) + examples(["meh"]) + [("", "no prompt at all")]
    calibration, exhausted = build_calibration(tokenizer, items, seq_len=512, budget=10**6)
    assert exhausted and calibration.examples == len(items)
    assert calibration.prefixes == [tuple(tokenizer(SHOTS)["input_ids"]), tuple(tokenizer(other)["input_ids"])]
    assert calibration.prefix_of == [0, 0, 0, 1, 0, NO_PREFIX]
    assert calibration.multiplicity == [4, 1]
    full = [len(text) for _, text in items]
    assert calibration.full_sequences() == [tokenizer(text)["input_ids"] for _, text in items]
    assert calibration.tokens_counted == sum(full)
    assert calibration.tokens_run == sum(full) - 3 * len(SHOTS)
    assert calibration.describe()["repeated_prefix_tokens"] == 3 * len(SHOTS)


def test_budget_counts_each_prefix_once_and_stops_exactly():
    tokenizer = tiny_tokenizer()
    items = examples([f"review number {i}" for i in range(50)])
    budget = len(SHOTS) + 5 * len("Review: review number 0\nSentiment: positive") + 7
    calibration, exhausted = build_calibration(tokenizer, items, seq_len=512, budget=budget)
    assert not exhausted and calibration.tokens_run == budget
    own_lengths, covered, left = [len(t) - len(SHOTS) for _, t in items], 0, budget - len(SHOTS)
    while left > 0:
        left -= own_lengths[covered]
        covered += 1
    assert calibration.examples == covered == 6  # the sixth cut at the budget
    whole, _ = build_calibration(tokenizer, items, seq_len=512, budget=budget, share_prefix=False)
    assert whole.prefixes == [] and whole.tokens_run == whole.tokens_counted == budget
    assert whole.examples < calibration.examples


def test_short_shared_part_and_long_examples_run_whole():
    tokenizer = tiny_tokenizer()
    short = examples(["a", "b"], shared="Hi.\n\n")  # 5 shared tokens: below the threshold
    calibration, _ = build_calibration(tokenizer, short, seq_len=512, budget=10**6)
    assert calibration.prefixes == [] and calibration.full_sequences() == [tokenizer(t)["input_ids"] for _, t in short]
    long = examples(["x" * 100, "y"])
    calibration, _ = build_calibration(tokenizer, long, seq_len=80, budget=10**6)
    # the first piece (80 tokens) runs after the prefix; the rest in pieces of 80 from position 0, as without sharing
    pieces, _ = build_calibration(tokenizer, long, seq_len=80, budget=10**6, share_prefix=False)
    assert calibration.full_sequences() == pieces.full_sequences()
    assert calibration.prefix_of[0] == 0 and NO_PREFIX in calibration.prefix_of


def test_stage_summary_states_examples_covered_and_repeated_prefix_tokens(tiny_dir, tmp_path, monkeypatch):
    import json

    from rich.console import Console

    from sieve_cli.commands import capture as command
    from sieve_cli.tasks import bind_task
    from sieve_cli.workspace import Workspace

    from .test_capture import invoke
    from .test_tasks import write_task

    task = write_task(tmp_path, "multiple_choice", num_fewshot=2)
    ws = tmp_path / "ws"
    assert invoke("discover", tiny_dir, "-w", ws).exit_code == 0
    result = invoke("capture", "-w", ws, "--task", task, "--batch-size", 3, "--chunk-tokens", 200, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    examples = bind_task(Workspace(ws), None).examples("calibration")
    full = [len(e.text(" ")) for e in examples]  # one token per character
    groups: dict[str, int] = {}
    for e in examples:
        groups[e.shared] = groups.get(e.shared, 0) + 1
    repeated = sum((m - 1) * len(shared) for shared, m in groups.items())
    assert summary["exhausted"] and summary["examples_covered"] == len(examples) == summary["examples"]
    assert summary["tokens"] == sum(full) and summary["repeated_prefix_tokens"] == repeated > 0
    assert summary["tokens_run"] == sum(full) - repeated and summary["prefixes"] == len(groups)
    stats = read_stats(ws / "capture" / "stats.zarr")
    assert all(st.tokens == sum(full) for st in stats.values())
    monkeypatch.setattr(command, "console", Console(width=200, record=True))
    command.render(Workspace(ws), summary)
    shown = command.console.export_text()
    assert f"{len(examples)} covered of {len(examples)}" in shown and f"{repeated:,} repeated prefix tokens" in shown
    whole = invoke("capture", "-w", ws, "--batch-size", 3, "--chunk-tokens", 200, "--force", "--no-share-prefix", "--json")
    assert whole.exit_code == 0, whole.output
    summary = json.loads(whole.stdout)
    assert summary["repeated_prefix_tokens"] == 0 and summary["tokens_run"] == summary["tokens"] == sum(full)
    assert all(torch.allclose(a.gram, stats[site].gram, rtol=1e-5, atol=1e-5)
               for site, a in read_stats(ws / "capture" / "stats.zarr").items())


def test_a_refit_replays_the_stream_the_recorded_capture_ran():
    """fit's block-wise refit rebuilds the capture's stream from its manifest: one recorded before
    --share-prefix existed ran every example whole, a newer one says what it ran."""
    from sieve_cli.fit import _capture_options

    class Recorded:
        def __init__(self, options):
            self.options = options

        def require(self, stage):
            return {"inputs": {"options": self.options}}

    assert _capture_options(Recorded({"tokens": 100})).share_prefix is False
    assert _capture_options(Recorded({"tokens": 100, "share_prefix": True})).share_prefix is True
    assert _capture_options(Recorded({"tokens": 100, "share_prefix": False})).share_prefix is False


def test_capture_reads_the_calibration_split_a_task_names(tiny_dir, tmp_path):
    import json

    from sieve_cli.tasks import bind_task
    from sieve_cli.workspace import Workspace

    from .test_capture import invoke
    from .test_tasks import calibration_task

    task = calibration_task(tmp_path)
    ws = tmp_path / "ws"
    assert invoke("discover", tiny_dir, "-w", ws).exit_code == 0
    result = invoke("capture", "-w", ws, "--task", task, "--batch-size", 3, "--chunk-tokens", 200, "--tokens", 400,
                    "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    bound = bind_task(Workspace(ws), None)
    calibration = bound.examples("calibration")
    covered = calibration[: summary["examples_covered"]]
    # the budget stopped it inside the training split; what it ran came from there, in split order
    assert 0 < len(covered) < len(calibration) == summary["examples"] == 48
    assert all(e.text(" ").rsplit("\n\n", 1)[-1].startswith("Q: calib ") for e in covered)
    counted = sum(len(e.text(" ")) for e in covered)  # one token per character
    assert summary["tokens"] <= counted and summary["tokens"] > counted - len(covered[-1].text(" "))
