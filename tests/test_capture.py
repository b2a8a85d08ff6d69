import numpy as np
import pytest
import torch

from sieve_cli import accumulate
from sieve_cli.capture import CaptureOptions, capture_statistics
from sieve_cli.errors import InputError
from sieve_cli.matrices import find_matrices, sites_of
from sieve_cli.statistics import chunk_bounds, cut_sequences, reservoir_slots
from sieve_cli.store import read_site, read_stats, store_state

from .tiny import tiny_model

LENGTHS = [5, 9, 3, 12, 7, 8, 2, 11, 6]


def make_sequences(seed=0, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 100, (n,), generator=g).tolist() for n in lengths]


def recorded_inputs(model, sequences):
    """Every matrix's input rows, recorded with plain hooks, one unpadded sequence at a time."""
    rows = {m.name: [] for m in find_matrices(model)}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_pre_hook(lambda mod, args, name=name: rows[name].append(args[0].reshape(-1, args[0].shape[-1]).clone()))
        for name in rows
    ]
    with torch.no_grad():
        for seq in sequences:
            model(torch.tensor([seq]))
    for h in handles:
        h.remove()
    return {name: torch.cat(r) for name, r in rows.items()}


def run(model, sequences, path, **kw):
    extra = {k: kw.pop(k) for k in ("pad_id", "after_chunk", "fresh") if k in kw}
    options = CaptureOptions(**{"batch_size": 4, "chunk_tokens": 16, "samples_per_site": 8, **kw})
    return capture_statistics(model, sequences, options, path, **extra)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3"])
def test_gram_equals_float64_reference_from_plain_hooks(tmp_path, model_type):
    model = tiny_model(model_type)
    sequences = make_sequences()
    summary = run(model, sequences, tmp_path / "s.zarr")
    recorded = recorded_inputs(model, sequences)
    stats = read_stats(tmp_path / "s.zarr")
    sites = sites_of(find_matrices(model))
    assert list(stats) == list(sites)
    assert summary["tokens"] == sum(LENGTHS)
    for site, group in sites.items():
        x = recorded[group[0].name].double()
        st = stats[site]
        assert st.gram.dtype == torch.float64 and st.samples.dtype == torch.float16
        assert st.tokens == sum(LENGTHS) == x.shape[0]
        assert st.matrices == [m.name for m in group]
        torch.testing.assert_close(st.gram, x.T @ x, rtol=1e-5, atol=1e-5)
        # every sampled row is one of the site's real input rows (no padding rows, no zeros)
        dist = torch.cdist(st.samples.double(), x.half().double())
        assert dist.min(dim=1).values.max() < 1e-6, site


def test_padding_is_excluded_whatever_the_pad_id_and_batching(tmp_path, monkeypatch):
    model = tiny_model("llama")
    sequences = make_sequences(1)
    run(model, sequences, tmp_path / "a.zarr", pad_id=0, batch_size=4)
    run(model, sequences, tmp_path / "b.zarr", pad_id=77, batch_size=4)
    monkeypatch.setattr(accumulate, "DRAIN_TOKENS", 3)  # and float32 partial sums drained mid-chunk
    run(model, sequences, tmp_path / "c.zarr", batch_size=1)
    a, b, c = (read_stats(tmp_path / f"{n}.zarr") for n in "abc")
    for site in a:
        assert torch.equal(a[site].gram, b[site].gram)  # the pad token's id never reaches the sums
        torch.testing.assert_close(a[site].gram, c[site].gram, rtol=1e-5, atol=1e-5)  # nor does padding itself
        assert a[site].tokens == c[site].tokens == sum(LENGTHS)


class Interrupt(Exception):
    pass


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    model = tiny_model("llama")
    sequences = make_sequences(2)
    whole = run(model, sequences, tmp_path / "whole.zarr")
    assert whole["chunks"] >= 3

    def stop_after_1(k):
        if k == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(model, sequences, tmp_path / "cut.zarr", after_chunk=stop_after_1)
    state = store_state(tmp_path / "cut.zarr")
    assert state["next_chunk"] == 2 and not state["complete"]
    assert all(not m._forward_pre_hooks for m in model.modules())  # hooks gone on the error path
    resumed = run(model, sequences, tmp_path / "cut.zarr")
    assert resumed["resumed_from_chunk"] == 2 and resumed["tokens"] == whole["tokens"]
    a, b = read_stats(tmp_path / "whole.zarr"), read_stats(tmp_path / "cut.zarr")
    for site in a:
        assert torch.equal(a[site].gram, b[site].gram)
        assert torch.equal(a[site].samples, b[site].samples)
        assert a[site].tokens == b[site].tokens
    assert store_state(tmp_path / "cut.zarr")["complete"]


def test_crash_inside_a_flush_keeps_the_previous_state(tmp_path, monkeypatch):
    model = tiny_model("llama")
    sequences = make_sequences(3)
    run(model, sequences, tmp_path / "whole.zarr")
    path = tmp_path / "cut.zarr"
    import zarr

    calls = {"n": 0}
    original = zarr.Group.create_array

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 16 + 5:  # the second flush (16 arrays per flush), part-way through
            raise OSError("disk went away")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", failing)
    with pytest.raises(OSError):
        run(model, sequences, path)
    monkeypatch.undo()
    assert path.with_name("cut.zarr.tmp").exists()  # the half-written state is left behind...
    assert store_state(path)["next_chunk"] == 1  # ...but the readable store is the first flush
    assert not path.with_name("cut.zarr.tmp").exists()
    run(model, sequences, path)
    a, b = read_stats(tmp_path / "whole.zarr"), read_stats(path)
    assert all(torch.equal(a[s].gram, b[s].gram) and torch.equal(a[s].samples, b[s].samples) for s in a)


def test_crash_between_the_two_renames_is_recovered(tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "s.zarr"
    run(model, make_sequences(4), path)
    before = read_site(path, "1.mlp_out")
    path.rename(path.with_name("s.zarr.old"))  # the state a kill between os.replace calls leaves
    after = read_site(path, "1.mlp_out")
    assert torch.equal(before.gram, after.gram) and path.exists()


def test_hooks_leave_outputs_unchanged_and_are_removed(tmp_path):
    model = tiny_model("llama")
    ids = torch.tensor([make_sequences(5)[3]])
    with torch.no_grad():
        before = model(ids).logits
    acc = accumulate.Accumulators.empty(sites_of(find_matrices(model)), 4, torch.device("cpu"), torch.float32)
    with torch.no_grad(), accumulate.SiteHooks(model, sites_of(find_matrices(model)), acc, accumulate.BatchRows()):
        during = model(ids).logits
        assert sum(len(m._forward_pre_hooks) for m in model.modules()) == len(acc.grams)
    run(model, make_sequences(5), tmp_path / "s.zarr")
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, during) and torch.equal(before, after)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_reservoir_is_uniform_over_the_stream():
    capacity, stream, trials = 10, 60, 3000
    counts = np.zeros(stream)
    rng = np.random.default_rng(0)
    for _ in range(trials):
        slots_of = {}
        seen = 0
        for size in (7, 1, 13, 25, 14):  # uneven batches, as padding leaves them
            rows, slots = reservoir_slots(seen, size, capacity, rng)
            assert len(set(slots.tolist())) == len(slots)
            for r, s in zip(rows, slots):
                slots_of[int(s)] = seen + int(r)
            seen += size
        assert len(slots_of) == capacity
        counts[list(slots_of.values())] += 1
    freq = counts / trials  # each item held with probability capacity / stream = 1/6
    assert np.abs(freq - capacity / stream).max() < 0.035, freq


def test_reservoir_matches_sequential_algorithm_r():
    capacity = 5
    batched, sequential = list(range(capacity)), list(range(capacity))
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    seen = 0
    for size in (3, 9, 4, 20):
        rows, slots = reservoir_slots(seen, size, capacity, rng_a)
        for r, s in zip(rows, slots):
            batched[s] = seen + r
        draws = rng_b.random(size)
        for k in range(size):
            i = seen + k
            j = i if i < capacity else int(np.floor(draws[k] * (i + 1)))
            if j < capacity:
                sequential[j] = i
        seen += size
    assert batched == sequential


def test_cut_sequences_stops_exactly_at_the_budget():
    examples = [list(range(10)), list(range(3)), list(range(25))]
    seqs, exhausted = cut_sequences(examples, seq_len=8, budget=30)
    assert [len(s) for s in seqs] == [8, 2, 3, 8, 8, 1] and not exhausted
    assert seqs[0] == list(range(8)) and seqs[1] == [8, 9]
    seqs, exhausted = cut_sequences(examples, seq_len=8, budget=1000)
    assert sum(map(len, seqs)) == 38 and exhausted
    assert chunk_bounds([5, 5, 5, 5, 1], 10) == [(0, 2), (2, 4), (4, 5)]


def test_options_name_the_flag():
    with pytest.raises(InputError, match="--tokens"):
        CaptureOptions(tokens=0)
    with pytest.raises(InputError, match="--samples-per-site"):
        CaptureOptions(samples_per_site=-1)


# ---- the stage and the command ---------------------------------------------------------

import json  # noqa: E402

import yaml  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from sieve_cli.capture import run_capture  # noqa: E402
from sieve_cli.errors import StaleStageError  # noqa: E402
from sieve_cli.tasks import bind_task  # noqa: E402
from sieve_cli.workspace import Workspace  # noqa: E402

from .test_tasks import write_task  # noqa: E402
from .tiny import tiny_tokenizer  # noqa: E402


def invoke(*args):
    from sieve_cli.cli import app

    return CliRunner().invoke(app, list(map(str, args)))


def test_cli_captures_the_calibration_split_reuses_and_refuses_a_changed_task(tiny_dir, tmp_path):
    ws = tmp_path / "ws"
    task = write_task(tmp_path, "text_modelling")
    assert invoke("discover", tiny_dir, "-w", ws).exit_code == 0
    result = invoke("capture", "-w", ws, "--task", task, "--batch-size", 3, "--chunk-tokens", 40, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    texts = bind_task(Workspace(ws), None).texts("calibration")
    expected = sum(len(ids) for ids in tiny_tokenizer()(texts)["input_ids"])
    assert summary["tokens"] == expected and summary["exhausted"] and summary["chunks"] > 1
    stats = read_stats(ws / "capture" / "stats.zarr")
    assert len(stats) == 8 and all(st.tokens == expected for st in stats.values())
    assert json.loads((ws / "capture" / "manifest.json").read_text())["complete"]
    again = invoke("capture", "-w", ws, "--batch-size", 3, "--chunk-tokens", 40)  # the bound task, same options: nothing to do
    assert again.exit_code == 0 and "up to date" in again.output
    raw = yaml.safe_load(task.read_text())
    raw["doc_to_text"] = "Now say: {{ sentence }}"
    task.write_text(yaml.safe_dump(raw))
    refused = invoke("capture", "-w", ws, "--task", task)
    assert refused.exit_code == 1 and "--force" in refused.output and "Traceback" not in refused.output
    forced = invoke("capture", "-w", ws, "--task", task, "--batch-size", 3, "--force", "--json")
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.stdout)["tokens"] != expected  # the new prompt is longer


def test_stage_stops_at_the_budget_and_refuses_a_changed_model(tiny_dir, tmp_path):
    from sieve_cli.discover import DiscoverOptions, run_discover

    from .tiny import save_tiny

    ws = Workspace(tmp_path / "ws")
    run_discover(ws, DiscoverOptions(model=str(tiny_dir)))
    options = CaptureOptions(task=str(write_task(tmp_path, "multiple_choice")), tokens=50, batch_size=2, chunk_tokens=20, samples_per_site=4)
    summary = run_capture(ws, options)
    assert summary["tokens"] == 50 and not summary["exhausted"]
    assert read_site(ws.capture_store, "0.attn_in").samples.shape == (4, 32)
    other = save_tiny(tmp_path / "other", "llama", seed=1)
    run_discover(ws, DiscoverOptions(model=str(other)), force=True)
    with pytest.raises(StaleStageError, match="discover"):
        run_capture(ws, options)
