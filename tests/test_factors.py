"""FactorSet storage: lean per-block shards, lazy reads, dtypes, device-held slices, old workspaces."""

import pytest
import torch

from sieve_cli.errors import InputError
from sieve_cli.factorize import output_basis, truncate
from sieve_cli.factors import FactorSet, break_even_rank, shard_name
from sieve_cli.fit import FitOptions, load_factors, run_fit
from sieve_cli.matrices import find_matrices, weight_of
from sieve_cli.models import load_model
from sieve_cli.pruned import prune_in_memory
from sieve_cli.store import read_site

from .test_fit import make_workspace
from .tiny import save_tiny


def test_save_load_and_slicing(tmp_path):
    torch.manual_seed(0)
    B, A = torch.randn(6, 4), torch.randn(4, 5)
    fs = FactorSet("output", full={"m.q": (B, A)}, fixed={"m.k": {2: (torch.randn(3, 2), torch.randn(2, 5))}},
                   blocks={"m.q": 0, "m.k": 1})
    written = fs.save(tmp_path / "f.json", lean=False)
    assert sorted(p.name for p in written) == ["f.json", shard_name(0), shard_name(1)]
    back = FactorSet.load(tmp_path / "f.json")
    assert back.method == "output" and back.names() == ["m.q", "m.k"]
    b2, a2 = back.pair("m.q", 2)
    torch.testing.assert_close(b2, B[:, :2])
    torch.testing.assert_close(a2, A[:2])
    assert back.ranks("m.q") is None and back.ranks("m.k") == [2]
    torch.testing.assert_close(back.pair("m.k", 2)[0], fs.pair("m.k", 2)[0])
    with pytest.raises(InputError, match="has no factors of rank 3"):
        back.pair("m.k", 3)
    with pytest.raises(InputError, match="exceeds"):
        back.pair("m.q", 5)
    # lean: 6 x 5 breaks even at rank 30 // 11 = 2, so rank 3 is not stored
    fs.save(tmp_path / "lean.json")
    lean = FactorSet.load(tmp_path / "lean.json")
    assert lean.max_rank("m.q") == break_even_rank(6, 5) == 2
    with pytest.raises(InputError, match="break-even"):
        lean.pair("m.q", 3)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def fitted(request, tmp_path_factory):
    """A tiny float32 model's workspace with an output fit."""
    root = tmp_path_factory.mktemp(f"factors-{request.param}")
    model_dir = save_tiny(root / "model", request.param)
    ws, model = make_workspace(root / "ws", model_dir)
    run_fit(ws, FitOptions(method="output"), model=model)
    return ws, model


def test_lean_shards_equal_the_full_bases_at_every_stored_rank(fitted):
    ws, model = fitted
    factors = load_factors(ws, "output")
    for m in find_matrices(model):
        W = weight_of(model.get_submodule(m.name)).detach().double()
        full = output_basis(W, read_site(ws.capture_store, m.site).gram)
        limit = break_even_rank(m.out_features, m.in_features)
        assert factors.max_rank(m.name) == limit < min(m.out_features, m.in_features)
        for r in range(limit + 1):
            B, A = factors.pair(m.name, r)
            B_full, A_full = truncate(full.B.float(), full.A.float(), r)
            assert B.dtype == torch.float32  # the model's dtype
            assert torch.equal(B, B_full) and torch.equal(A, A_full)


def test_lazy_loading_opens_only_the_requested_block(fitted, tmp_path):
    ws, model = fitted
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(ws.fit_dir("output"), folder)
    block0 = [m for m in find_matrices(model) if m.block == 0]
    (folder / shard_name(1)).unlink()  # another block's shard gone: block 0 still loads
    factors = FactorSet.load(folder / "factors.json")
    assert factors.files_read() == set()  # opening reads the index only
    for m in block0:
        B, A = factors.pair(m.name, 1)
        assert B.shape == (m.out_features, 1)
    assert factors.files_read() == {shard_name(0)}
    block1 = next(m for m in find_matrices(model) if m.block == 1)
    with pytest.raises(InputError, match=shard_name(1)):
        factors.pair(block1.name, 1)
    # an index may only name shards beside it
    factors.index[block1.name]["file"] = "../../outside.safetensors"
    with pytest.raises(InputError, match="as a shard"):
        factors.pair(block1.name, 1)


def shard_bytes(folder):
    return sum(p.stat().st_size for p in folder.glob("factors-*.safetensors"))


def test_factor_dtype_is_the_models_or_the_one_asked_for(tmp_path, tiny_dir):
    ws, model = make_workspace(tmp_path / "ws", tiny_dir)
    run_fit(ws, FitOptions(method="output", factor_dtype="bfloat16"), model=model)
    bf16, bf16_bytes = load_factors(ws, "output").load_all(), shard_bytes(ws.fit_dir("output"))
    run_fit(ws, FitOptions(method="output", factor_dtype="float32"), model=model, force=True)
    f32, f32_bytes = load_factors(ws, "output"), shard_bytes(ws.fit_dir("output"))
    for name in f32.names():
        b16, a16 = bf16.pair(name, bf16.max_rank(name))
        b32, a32 = f32.pair(name, f32.max_rank(name))
        assert b16.dtype == a16.dtype == torch.bfloat16 and b32.dtype == torch.float32
        assert torch.equal(b16, b32.to(torch.bfloat16)) and torch.equal(a16, a32.to(torch.bfloat16))
    assert 1.9 < f32_bytes / bf16_bytes < 2.0  # half the bytes, less the same headers
    # by default ("model") a bfloat16 model's factors are stored in bfloat16
    ws16 = make_workspace(tmp_path / "ws16", tiny_dir)[0]
    model16, _ = load_model(str(tiny_dir), "bfloat16", "cpu")
    run_fit(ws16, FitOptions(method="output"), model=model16)
    assert {load_factors(ws16, "output").pair(n, 1)[0].dtype for n in f32.names()} == {torch.bfloat16}


def test_keep_on_holds_each_matrix_once_and_slices_it(fitted):
    ws, model = fitted
    factors = load_factors(ws, "output").keep_on("cpu", torch.float64)
    name = factors.names()[0]
    B2, A2 = factors.pair(name, 2)
    B3, A3 = factors.pair(name, 3)
    assert B2.dtype == torch.float64
    # slices of one held tensor: no copy per candidate
    assert B2.untyped_storage().data_ptr() == B3.untyped_storage().data_ptr()
    assert A2.untyped_storage().data_ptr() == A3.untyped_storage().data_ptr()
    torch.testing.assert_close(B3[:, :2], B2)


def test_pruned_model_is_the_same_from_lean_shards_as_from_full_bases(fitted):
    """What search and apply build from the lean shards equals what the full float32 bases give."""
    ws, model = fitted
    lean = load_factors(ws, "output")
    full = FactorSet("output")
    for m in find_matrices(model):
        W = weight_of(model.get_submodule(m.name)).detach().double()
        basis = output_basis(W, read_site(ws.capture_store, m.site).gram)
        full.full[m.name] = (basis.B.float(), basis.A.float())
    ranks = {n: max(1, lean.max_rank(n) // (i % 3 + 1)) for i, n in enumerate(lean.names())}
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    outputs = []
    for factors in (lean, full):
        restore = prune_in_memory(model, ranks, factors)
        with torch.no_grad():
            outputs.append(model(ids).logits)
        restore()
    assert torch.equal(outputs[0], outputs[1])


def test_old_single_file_workspace_names_the_refit(fitted, tmp_path):
    ws, _ = fitted
    old = tmp_path / "old"
    old.mkdir()
    (old / "factors.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match="sieve fit --force"):
        FactorSet.load(old / "factors.json")


def test_a_damaged_shard_of_the_same_size_is_refused_not_used(tmp_path):
    """Garbled factor bytes would give an applied model with other weights and exit 0: the index's hash catches it."""
    fs = FactorSet("output")
    fs.full["m"] = (torch.randn(8, 8), torch.randn(8, 8))
    fs.blocks["m"] = 0
    index = tmp_path / "factors.json"
    fs.save(index)
    shard = tmp_path / shard_name(0)
    data = bytearray(shard.read_bytes())
    data[-8:] = bytes(8 - b % 8 for b in data[-8:])  # same length, other bytes in the tensor data
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match="does not match the hash its fit recorded"):
        FactorSet.load(index).pair("m", 2)
