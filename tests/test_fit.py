"""The fit stage on tiny random models with a real capture store; the CLI; one slow SmolLM2 run."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sieve_cli.capture import CaptureOptions, capture_statistics
from sieve_cli.cli import app
from sieve_cli.discover import DiscoverOptions, run_discover
from sieve_cli.errors import MissingStageError, StaleStageError
from sieve_cli.fit import (
    EmptySiteError,
    FitOptions,
    load_factors,
    load_spectrum,
    run_fit,
)
from sieve_cli.lowrank import rank_for_fraction
from sieve_cli.matrices import find_matrices, weight_of
from sieve_cli.models import load_model
from sieve_cli.store import SiteStats, read_site
from sieve_cli.workspace import Workspace

from .tiny import save_tiny


def make_workspace(root, model_dir, tokens=160, seed=0, samples=64):
    """discover + a real capture store over random token ids, with a capture manifest."""
    ws = Workspace(root)
    run_discover(ws, DiscoverOptions(model=str(model_dir)))
    model, _ = load_model(str(model_dir), "float32", "cpu")
    rng = np.random.default_rng(seed)
    sequences = [rng.integers(3, 100, size=16).tolist() for _ in range(tokens // 16)]
    options = CaptureOptions(tokens=tokens, batch_size=4, samples_per_site=samples, chunk_tokens=64, seed=seed)
    inputs = {"options": options.recorded(), "sequences": seed}
    ws.begin("capture", inputs)
    capture_statistics(model, sequences, options, ws.capture_store)
    ws.finish("capture", inputs, [ws.capture_store])
    return ws, model


@pytest.fixture(scope="module")
def llama_ws(tmp_path_factory, tiny_dir):
    return make_workspace(tmp_path_factory.mktemp("fit-ws"), tiny_dir)


def reference_relative(W, C):
    """Relative output error at r = 0..K from numpy's float64 eigenvalues of W C W^T."""
    W, C = W.astype(np.float64), C.astype(np.float64)
    eig = np.sort(np.linalg.eigvalsh(W @ C @ W.T))[::-1].clip(min=0)
    K = min(W.shape)
    return np.array([eig[r:].sum() for r in range(K + 1)]) / np.trace(W @ C @ W.T)


def measured_relative(W, C, B, A):
    E = W.astype(np.float64) - B.numpy().astype(np.float64) @ A.numpy().astype(np.float64)
    return np.trace(E @ C @ E.T) / np.trace(W @ C @ W.T)


def test_output_fit_writes_exact_spectra_and_factors(llama_ws):
    ws, model = llama_ws
    summary = run_fit(ws, FitOptions(method="output"), model=model)
    matrices = find_matrices(model)
    assert summary["matrices"] == len(matrices) == 14
    assert set(summary["relative_error"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    factors, spectrum = load_factors(ws, "output"), load_spectrum(ws, "output")
    assert sorted(spectrum) == sorted(m.name for m in matrices) == sorted(factors.names())
    for m in matrices:
        W = weight_of(model.get_submodule(m.name)).detach().double().numpy()
        C = read_site(ws.capture_store, m.site).gram.numpy()
        ref = reference_relative(W, C)
        got = np.array(spectrum[m.name])
        np.testing.assert_allclose(got, ref, atol=1e-9)
        limit = m.out_features * m.in_features // (m.out_features + m.in_features)
        assert factors.max_rank(m.name) == limit  # stored only up to the break-even rank
        for r in (1, limit // 2, limit):  # the stored float32 factors give the recorded error
            assert measured_relative(W, C, *factors.pair(m.name, r)) == pytest.approx(ref[r], abs=1e-5)
    # summary means are the spectrum read at rank_for_fraction
    qs = [m for m in matrices if m.kind == "q"]
    expected = np.mean([spectrum[m.name][rank_for_fraction(0.5, m.out_features, m.in_features)] for m in qs])
    assert summary["relative_error"]["q"]["0.5"] == pytest.approx(expected)
    again = run_fit(ws, FitOptions(method="output"), model=model)
    assert again["up_to_date"]


def test_methods_coexist_and_output_is_best(llama_ws):
    ws, model = llama_ws
    levels = (0.9, 0.5)
    for method in ("output", "svd", "pca"):
        run_fit(ws, FitOptions(method=method), model=model)
    run_fit(ws, FitOptions(method="learned", levels=levels, init="output", max_steps=50), model=model)
    spectra = {m: load_spectrum(ws, m) for m in ("output", "svd", "pca", "learned")}
    learned = load_factors(ws, "learned")
    for m in find_matrices(model):
        out = np.array(spectra["output"][m.name])
        for other in ("svd", "pca"):
            assert np.all(out <= np.array(spectra[other][m.name]) + 1e-9)
        ranks = sorted({rank_for_fraction(p, m.out_features, m.in_features) for p in levels})
        assert learned.ranks(m.name) == ranks
        trained = [r for r, v in enumerate(spectra["learned"][m.name]) if v is not None]
        assert trained == ranks
        W = weight_of(model.get_submodule(m.name)).detach().double().numpy()
        C = read_site(ws.capture_store, m.site).gram.numpy()
        for r in ranks:
            value = spectra["learned"][m.name][r]
            assert value == pytest.approx(measured_relative(W, C, *learned.pair(m.name, r)), rel=1e-6)
            assert out[r] <= value + 1e-6
    for method in ("output", "svd", "pca", "learned"):
        assert ws.read_manifest(ws.fit_stage(method))["complete"]
    # changing how learned trains makes it stale, but leaves the other methods alone
    with pytest.raises(StaleStageError, match="--force"):
        run_fit(ws, FitOptions(method="learned", levels=levels, init="output", max_steps=60), model=model)
    assert run_fit(ws, FitOptions(method="output", max_steps=9), model=model)["up_to_date"]


def test_gpt2_conv1d_is_fitted_as_out_by_in(tmp_path):
    # every calibration token is kept as a sample, so the module's own outputs on them measure the error
    ws, model = make_workspace(tmp_path / "ws", save_tiny(tmp_path / "gpt2", "gpt2"), samples=1000)
    run_fit(ws, FitOptions(method="output"), model=model)
    factors, spectrum = load_factors(ws, "output"), load_spectrum(ws, "output")
    for m in find_matrices(model):
        assert m.transposed
        module = model.get_submodule(m.name)
        rank = factors.max_rank(m.name)
        B, A = factors.pair(m.name, rank)
        assert B.shape == (m.out_features, rank) and A.shape == (rank, m.in_features)
        x = read_site(ws.capture_store, m.site).samples.double()
        with torch.no_grad():
            y = (module(x.float()) - module.bias).double()
        # (not W itself: the error is judged on the module's outputs; samples are float16-rounded)
        error = float(((y - x @ A.double().T @ B.double().T) ** 2).sum() / (y**2).sum())
        assert error == pytest.approx(spectrum[m.name][rank], rel=2e-2, abs=1e-6)


def test_missing_inputs_and_empty_sites_are_named(tmp_path, llama_ws, monkeypatch):
    ws = Workspace(tmp_path / "empty")
    with pytest.raises(MissingStageError, match="sieve discover"):
        run_fit(ws, FitOptions())
    with pytest.raises(MissingStageError, match=r"sieve fit -w .* --method svd"):
        load_factors(ws, "svd")
    full_ws, model = llama_ws
    site_stats = read_site(full_ws.capture_store, "0.attn_in")
    empty = SiteStats(gram=torch.zeros_like(site_stats.gram), samples=site_stats.samples[:0], tokens=0,
                      matrices=site_stats.matrices)
    monkeypatch.setattr("sieve_cli.fit._read_site", lambda store, site: empty)
    with pytest.raises(EmptySiteError, match="0.attn_in saw no calibration tokens"):
        run_fit(full_ws, FitOptions(method="pca"), model=model, force=True)


def test_cli_fits_several_methods_and_renders_the_table(llama_ws):
    ws, _ = llama_ws
    runner = CliRunner()
    result = runner.invoke(app, ["fit", "-w", str(ws.root), "-m", "svd,output", "--force"])
    assert result.exit_code == 0, result.output
    assert "0.75 kept" in result.output and "svd" in result.output and "gate" in result.output
    result = runner.invoke(app, ["fit", "-w", str(ws.root), "-m", "svd", "--json"])
    assert result.exit_code == 0, result.output
    (summary,) = json.loads(result.stdout)
    assert summary["up_to_date"] and summary["method"] == "svd"
    bad = runner.invoke(app, ["fit", "-w", str(ws.root), "-m", "qr"])
    assert bad.exit_code == 1 and "--method must be one of" in bad.output


def test_learned_summary_states_steps_and_the_optimum_below_it(llama_ws):
    ws, _ = llama_ws
    result = CliRunner().invoke(app, ["fit", "-w", str(ws.root), "-m", "learned", "--levels", "0.5",
                                      "--max-steps", "300", "--force", "--json"])
    assert result.exit_code == 0, result.output
    (summary,) = json.loads(result.stdout)
    training = json.loads((ws.fit_dir("learned") / "training.json").read_text())
    output = load_spectrum(ws, "output") if (ws.fit_dir("output") / "spectrum.json").exists() else None
    for name, per_rank in training.items():
        for rank, d in per_rank.items():
            assert 0 < d["steps"] <= 300 and d["stopped"] in ("plateau", "max_steps")
            assert d["relative"] >= d["optimum"] - 1e-6  # never below the exact optimum
            if output is not None:
                assert d["optimum"] == pytest.approx(output[name][int(rank)], abs=1e-9)
    for kind, per_level in summary["relative_error"].items():
        assert per_level["0.5"] >= summary["optimum_error"][kind]["0.5"] - 1e-6
    shown = CliRunner().invoke(app, ["fit", "-w", str(ws.root), "-m", "learned", "--levels", "0.5", "--max-steps", "300"])
    assert "(optimum)" in shown.output and "Adam steps per rank" in shown.output


@pytest.mark.slow
def test_smollm2_output_fit_on_one_block(smollm2_gguf, tmp_path):
    """The real model's shapes: q (H = D) and gate (1536 x 576, the smaller-side path) of block 0."""
    from sieve_cli.factorize import output_basis

    model, _ = load_model(str(smollm2_gguf), "float32", "cpu")
    torch.manual_seed(0)
    for m in [m for m in find_matrices(model) if m.block == 0 and m.kind in ("q", "gate")]:
        W = weight_of(model.get_submodule(m.name)).detach().double()
        X = torch.randn(m.in_features, 300, dtype=torch.float64)  # rank-deficient C: 300 < D
        C = X @ X.T
        basis = output_basis(W, C)
        ref = reference_relative(W.numpy(), C.numpy())
        np.testing.assert_allclose(basis.relative().numpy(), ref, atol=1e-8)


def test_a_garbled_capture_chunk_is_refused_before_fitting(tmp_path, tiny_dir):
    """Same-size garbage in a Gram chunk would give a fit of garbage with exit 0: the recorded hashes catch it."""
    from sieve_cli.errors import SieveError

    ws, _ = make_workspace(tmp_path / "ws", tiny_dir)
    chunks = sorted(p for p in ws.capture_store.rglob("*") if p.is_file() and "gram" in p.parts and p.name != "zarr.json")
    data = bytearray(chunks[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunks[0].write_bytes(bytes(data))
    with pytest.raises(SieveError, match="is not what the capture stage wrote"):
        run_fit(ws, FitOptions(method="output"))
    chunks[0].unlink()  # a deleted chunk is caught by the cheap size/count check of every later stage
    with pytest.raises(SieveError, match="stats.zarr is not what the capture stage wrote"):
        ws.require("capture")
