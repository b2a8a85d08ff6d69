"""Block-wise capture and fit against the in-memory path, on tiny models of three families.

The reference is the in-memory code path on the fully loaded model (its own forward, its
own hooks); block-wise must give the same hidden states after every block, the same
statistics, and the same factors and spectra.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sieve_cli.blockwise import SafetensorsWeights, capture_and_fit, open_runner
from sieve_cli.capture import CaptureOptions, capture_statistics, run_capture
from sieve_cli.discover import DiscoverOptions, diagnose, run_discover
from sieve_cli.errors import ModelLoadError
from sieve_cli.factors import StoredFactors
from sieve_cli.fit import FitOptions, fit_model, fit_site, load_factors, load_spectrum, run_fit
from sieve_cli.memory import MemoryBudgetError, parse_bytes
from sieve_cli.models import load_model, meta_model
from sieve_cli.store import read_stats
from sieve_cli.workspace import Workspace

from .test_tasks import write_task
from .tiny import BLOCK_FAMILIES, save_tiny, tiny_model

FAMILIES = BLOCK_FAMILIES  # the `folders` fixture (conftest) saves one of each
# sequences longer than Gemma 3's sliding window (16)
LENGTHS = [5, 9, 3, 12, 7, 8, 2, 11, 6, 30, 25]


def make_sequences(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 100, (n,), generator=g).tolist() for n in LENGTHS]


OPTIONS = CaptureOptions(batch_size=4, chunk_tokens=16, samples_per_site=8)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_calls_reproduce_the_in_memory_forward(folders, family):
    """Each real block called with what the model hands it gives the hidden states that the
    whole model's forward gives after that block (padded batch: masks and positions matter)."""
    model, _ = load_model(str(folders[family]), "float32", "cpu")
    if family == "gemma3_text":
        assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
    runner = open_runner(folders[family], torch.float32, "cpu")
    seqs = make_sequences()[-4:]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        states = model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    hidden = None
    for index in range(len(runner.blocks)):
        args, kwargs = runner.call_of(index, {"input_ids": ids, "attention_mask": mask})
        hidden = args[0] if index == 0 else hidden
        with runner.loaded(index) as block, torch.no_grad():
            out = block(hidden, *args[1:], **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        real = mask.bool()
        if index < len(runner.blocks) - 1:  # HF applies the final norm to the last entry
            assert torch.equal(hidden[real], states[index + 1][real]), index
    assert all(p.device.type == "meta" for p in runner.blocks.parameters())  # unloaded again


@pytest.mark.parametrize("family", FAMILIES)
def test_blockwise_statistics_and_factors_equal_in_memory(folders, family, tmp_path):
    model, _ = load_model(str(folders[family]), "float32", "cpu")
    sequences = make_sequences()
    capture_statistics(model, sequences, OPTIONS, tmp_path / "memory.zarr")
    factors, spectrum = fit_model(model, tmp_path / "memory.zarr", FitOptions(method="output"))
    runner = open_runner(folders[family], torch.float32, "cpu")
    result = capture_and_fit(runner, sequences, OPTIONS, [FitOptions(method="output")], tmp_path / "work", fit_site, store=tmp_path / "block.zarr")
    ref, got = read_stats(tmp_path / "memory.zarr"), read_stats(tmp_path / "block.zarr")
    assert list(ref) == list(got)
    for site in ref:
        torch.testing.assert_close(got[site].gram, ref[site].gram, rtol=1e-10, atol=1e-10)
        assert torch.equal(got[site].samples, ref[site].samples) and got[site].tokens == ref[site].tokens == sum(LENGTHS)
    blockwise = result.factors["output"]
    # the blocks' factors are merged by index, not loaded: nothing has been read back yet
    assert isinstance(blockwise, StoredFactors) and blockwise.files_read() == set()
    assert sorted(blockwise.names()) == sorted(factors.names())
    for name in factors.names():
        np.testing.assert_allclose(result.spectra["output"][name], spectrum[name], atol=1e-9)
        B, A = factors.pair(name, factors.max_rank(name) // 2)
        B2, A2 = blockwise.pair(name, factors.max_rank(name) // 2)
        torch.testing.assert_close(B2 @ A2, B @ A, atol=1e-4, rtol=1e-4)  # the rank-r map (bases agree up to sign)


class Killed(Exception):
    pass


@pytest.mark.parametrize("tier", ["device", "disk"])
def test_killed_run_resumes_after_its_last_finished_block(folders, tmp_path, tier):
    runner = open_runner(folders["llama"], torch.float32, "cpu")
    sequences = make_sequences(1)
    whole = capture_and_fit(runner, sequences, OPTIONS, [FitOptions(method="output")], tmp_path / "whole", fit_site, tier=tier)

    def kill_after_block_0(index):
        if index == 0:
            raise Killed

    with pytest.raises(Killed):
        capture_and_fit(runner, sequences, OPTIONS, [FitOptions(method="output")], tmp_path / "cut", fit_site, tier=tier,
                        after_block=kill_after_block_0)
    assert all(not m._forward_pre_hooks for m in runner.model.modules())
    if tier == "disk":
        assert (tmp_path / "cut" / "hidden-00001").is_dir()  # block 1's inputs survive the kill
    resumed = capture_and_fit(runner, sequences, OPTIONS, [FitOptions(method="output")], tmp_path / "cut", fit_site, tier=tier)
    assert resumed.summary["resumed_from_block"] == 1
    for name, values in whole.spectra["output"].items():
        assert resumed.spectra["output"][name] == values
    whole_factors, resumed_factors = whole.factors["output"].load_all(), resumed.factors["output"].load_all()
    for name in whole_factors.names():
        assert all(torch.equal(a, b) for a, b in zip(whole_factors.full[name], resumed_factors.full[name]))
    assert not list((tmp_path / "cut").glob("hidden-*"))  # the cache is removed at the end


def test_stage_blockwise_capture_fits_output_and_a_later_fit_recomputes(folders, tmp_path):
    """`capture --mode blockwise` records fit/output; `fit --method svd` recomputes the
    statistics block by block; both equal the in-memory stages."""
    task = write_task(tmp_path, "text_modelling")
    spaces = {}
    for mode in ("memory", "blockwise"):
        ws = Workspace(tmp_path / mode)
        run_discover(ws, DiscoverOptions(model=str(folders["llama"])))
        summary = run_capture(ws, CaptureOptions(task=str(task), batch_size=3, chunk_tokens=40, mode=mode))
        assert summary["mode"] == mode and summary["estimate"]["total_bytes"] > 0
        if mode == "memory":
            run_fit(ws, FitOptions(method="output"))
        run_fit(ws, FitOptions(method="svd"))
        spaces[mode] = ws
    block_ws = spaces["blockwise"]
    assert not block_ws.capture_store.exists()  # no statistics kept unless asked
    assert run_fit(block_ws, FitOptions(method="output"))["up_to_date"]
    assert block_ws.read_manifest("fit/svd")["summary"]["mode"] == "blockwise"
    for method in ("output", "svd"):
        a, b = load_spectrum(spaces["memory"], method), load_spectrum(block_ws, method)
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_allclose(b[name], a[name], atol=1e-9)
        fa, fb = load_factors(spaces["memory"], method).load_all(), load_factors(block_ws, method).load_all()
        for name in fa.names():
            torch.testing.assert_close(fb.full[name][0] @ fb.full[name][1], fa.full[name][0] @ fa.full[name][1],
                                       atol=1e-4, rtol=1e-4)


def test_keep_stats_writes_the_store_and_fit_reads_weights_from_files(folders, tmp_path):
    task = write_task(tmp_path, "text_modelling")
    ws = Workspace(tmp_path / "ws")
    run_discover(ws, DiscoverOptions(model=str(folders["gpt2"])))
    run_capture(ws, CaptureOptions(task=str(task), batch_size=3, mode="blockwise", keep_stats=True))
    stats = read_stats(ws.capture_store)
    assert len(stats) == 8 and all(st.gram.abs().sum() > 0 for st in stats.values())
    summary = run_fit(ws, FitOptions(method="pca", mode="blockwise"))  # Conv1D weights read from the file
    assert summary["mode"] == "blockwise"
    model, _ = load_model(str(folders["gpt2"]), "float32", "cpu")
    _, reference = fit_model(model, ws.capture_store, FitOptions(method="pca"))
    got = load_spectrum(ws, "pca")
    for name in reference:
        np.testing.assert_allclose(got[name], reference[name], atol=1e-9)


def invoke(*args):
    from sieve_cli.cli import app

    return CliRunner().invoke(app, list(map(str, args)))


def test_budget_too_small_for_one_block_names_the_minimum(folders, tmp_path):
    task = write_task(tmp_path, "text_modelling")
    ws = tmp_path / "ws"
    assert invoke("discover", folders["llama"], "-w", ws).exit_code == 0
    result = invoke("capture", "-w", ws, "--task", task, "--mode", "blockwise", "--memory-budget", "1MiB")
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = " ".join(result.output.split())
    assert "--memory-budget of at least" in line and "GiB" in line
    minimum = float(line.split("--memory-budget of at least ")[1].split(" GiB")[0])
    ok = invoke("capture", "-w", ws, "--task", task, "--mode", "blockwise", "--memory-budget", f"{minimum + 0.01}GiB", "--json")
    assert ok.exit_code == 0, ok.output  # the minimum it named is enough
    refused = invoke("capture", "-w", ws, "--task", task, "--mode", "memory", "--memory-budget", "1MiB", "--force")
    assert refused.exit_code == 1 and "--mode blockwise" in refused.output and "--dtype bfloat16" in refused.output


def test_missing_or_corrupt_shard_is_named(folders, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(folders["llama"], folder)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    keys = list(SafetensorsWeights(folder).weight_map)
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in keys}}
    index["weight_map"][keys[-1]] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors is missing"):
        open_runner(folder, torch.float32, "cpu")
    shard = folder / "model-00001-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated download
    index["weight_map"][keys[-1]] = "model-00001-of-00001.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="model-00001-of-00001.safetensors is corrupt"):
        open_runner(folder, torch.float32, "cpu")


@pytest.mark.parametrize("family", FAMILIES + ["phi3"])
def test_discover_counts_on_the_meta_device_what_the_loaded_model_has(family, tmp_path):
    folder = save_tiny(tmp_path / family, family)
    counted = diagnose(meta_model(folder))
    assert all(p.device.type == "meta" for p in meta_model(folder).parameters())
    loaded = diagnose(tiny_model(family))
    assert counted == loaded


def test_parse_bytes_and_flag_named():
    assert parse_bytes("20GiB") == 20 * 2**30 and parse_bytes("1.5G") == 1_500_000_000 and parse_bytes("512") == 512
    from sieve_cli.errors import InputError

    with pytest.raises(InputError, match="--memory-budget"):
        CaptureOptions(memory_budget="lots")
    assert issubclass(MemoryBudgetError, InputError)


@pytest.mark.slow
def test_smollm2_blockwise_equals_in_memory_and_gives_the_same_plan(smollm2_gguf, data_root, tmp_path):
    """The real model (tied head stored as lm_head.weight in its dequantised cache): Grams,
    spectra and factors of block-wise capture+fit equal the in-memory stages, and a coarse
    uniform search on each workspace picks the same plan. sst2 is 4-shot: both run the shared
    prefix once (block-wise from its per-layer KV cache)."""
    from sieve_cli.search import SearchOptions, run_search

    task = "examples/tasks/sst2.yaml"
    spaces, summaries = {}, {}
    for mode in ("memory", "blockwise"):
        ws = Workspace(tmp_path / mode)
        run_discover(ws, DiscoverOptions(model=str(smollm2_gguf)))
        summaries[mode] = run_capture(ws, CaptureOptions(task=task, tokens=2048, samples_per_site=256, mode=mode, keep_stats=True))
        run_fit(ws, FitOptions(method="output"))
        spaces[mode] = ws
    assert summaries["memory"]["repeated_prefix_tokens"] > 0
    assert all(summaries["memory"][k] == summaries["blockwise"][k] for k in ("examples_covered", "tokens", "tokens_run"))
    ref, got = read_stats(spaces["memory"].capture_store), read_stats(spaces["blockwise"].capture_store)
    assert len(ref) == 120 and list(ref) == list(got)
    for site in ref:
        torch.testing.assert_close(got[site].gram, ref[site].gram, rtol=1e-9, atol=1e-6)
        assert torch.equal(got[site].samples, ref[site].samples)
    a, b = load_spectrum(spaces["memory"], "output"), load_spectrum(spaces["blockwise"], "output")
    fa, fb = load_factors(spaces["memory"], "output"), load_factors(spaces["blockwise"], "output")
    for name in a:
        np.testing.assert_allclose(b[name], a[name], atol=1e-8)
        rank = fa.max_rank(name) // 2
        torch.testing.assert_close(fb.pair(name, rank)[0] @ fb.pair(name, rank)[1],
                                   fa.pair(name, rank)[0] @ fa.pair(name, rank)[1], atol=1e-4, rtol=1e-3)
    search = SearchOptions(method="output", strategy="uniform", grid_step=0.25, limit=16, batch_size=16, allow_chance=True)
    plans = [run_search(spaces[mode], search) for mode in ("memory", "blockwise")]
    assert plans[0]["matrices"] == plans[1]["matrices"]
    assert plans[0]["metric"] == plans[1]["metric"]


def test_choose_mode_prefers_memory_then_blockwise_then_refuses():
    from sieve_cli.memory import Estimate, blockwise_minimum, choose_mode

    in_memory = Estimate("capture, in memory", {"weights": 600, "statistics": 400})
    block = Estimate("capture+fit, blockwise", {"weights": 100, "statistics": 100, "hidden cache": 300})
    assert choose_mode("auto", in_memory, block, 1000, "--memory-budget", "float32") == "memory"
    assert choose_mode("auto", in_memory, block, 999, "--memory-budget", "float32") == "blockwise"
    assert blockwise_minimum(block) == 200  # the hidden cache can go to disk
    assert choose_mode("blockwise", in_memory, block, 200, "--memory-budget", "float32") == "blockwise"
    with pytest.raises(MemoryBudgetError, match="--mode blockwise") as refused:
        choose_mode("memory", in_memory, block, 999, "--memory-budget", "float32")
    assert "--dtype bfloat16" in str(refused.value)
    with pytest.raises(MemoryBudgetError, match="at least 0.00 GiB") as refused:
        choose_mode("auto", in_memory, block, 199, "--memory-budget", "bfloat16")
    assert "--dtype bfloat16" not in str(refused.value)


def test_width_fit_blockwise_equals_in_memory(folders, tmp_path):
    """`fit --method width` after a block-wise capture recomputes each block's statistics and gives the
    in-memory width fit: the same keep order, refit and spectrum per unit."""
    task = write_task(tmp_path, "text_modelling")
    fits = {}
    for mode in ("memory", "blockwise"):
        ws = Workspace(tmp_path / mode)
        run_discover(ws, DiscoverOptions(model=str(folders["llama"])))
        run_capture(ws, CaptureOptions(task=str(task), batch_size=3, chunk_tokens=40, mode=mode))
        assert run_fit(ws, FitOptions(method="width"))["mode"] == mode
        fits[mode] = (load_factors(ws, "width"), load_spectrum(ws, "width"))
    (memory, memory_spectrum), (block, block_spectrum) = fits["memory"], fits["blockwise"]
    units = memory.width_units()
    assert [u.name for u in units] == [u.name for u in block.width_units()] and len(units) == 4
    for u in units:
        a, b = memory.basis(u.name), block.basis(u.name)
        assert torch.equal(a.order, b.order)
        torch.testing.assert_close(b.refit(u.units // 2), a.refit(u.units // 2), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(block_spectrum[u.name], memory_spectrum[u.name], atol=1e-9)
