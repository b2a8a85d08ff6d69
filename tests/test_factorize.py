"""The fit math against float64 numpy references on random data."""

import numpy as np
import pytest
import torch

from sieve_cli.factorize import (
    TrainSettings,
    error_at_fraction,
    gram_eigen,
    learn_factors,
    output_basis,
    output_error,
    output_total,
    pca_basis,
    relative_errors,
    svd_basis,
    tail_sums,
    truncate,
)
from sieve_cli.lowrank import fraction_for_rank, rank_for_fraction

# (H, D, tokens): wide, tall (the smaller-side path), square, and rank-deficient C (tokens < D).
SHAPES = [(6, 10, 40), (14, 8, 40), (9, 9, 30), (7, 12, 5), (16, 6, 3)]


def make(H, D, n, seed=0, anisotropic=True):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((H, D))
    X = rng.standard_normal((D, n))
    if anisotropic:  # task inputs live mostly in a few directions, as real activations do
        X *= np.geomspace(10, 0.1, D)[:, None]
    return W, X


def measured(W, X, W_r):
    """||W X - W_r X||_F^2 straight from the token matrix, float64 numpy."""
    return float(np.sum((W @ X - W_r @ X) ** 2))


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


@pytest.mark.parametrize("H,D,n", SHAPES)
def test_output_error_is_discarded_eigenvalues_and_the_applied_error(H, D, n):
    W, X = make(H, D, n)
    C = X @ X.T
    basis = output_basis(t(W), t(C))
    K = min(H, D)
    assert basis.B.shape == (H, K) and basis.A.shape == (K, D) and basis.errors.shape == (K + 1,)
    eig = np.sort(np.linalg.eigvalsh(W @ C @ W.T))[::-1]
    scale = np.trace(W @ C @ W.T)
    for r in range(K + 1):
        discarded = eig[r:].clip(min=0).sum()
        B, A = truncate(basis.B, basis.A, r)
        applied = measured(W, X, (B @ A).numpy())
        assert basis.errors[r].item() == pytest.approx(discarded, abs=1e-9 * scale)
        assert applied == pytest.approx(discarded, abs=1e-9 * scale)
        assert output_error(t(W), t(C), B, A) == pytest.approx(applied, abs=1e-9 * scale)
    assert basis.errors[0].item() == pytest.approx(output_total(t(W), t(C)), rel=1e-10)
    assert basis.errors[K].item() == pytest.approx(0, abs=1e-9 * scale)
    # B has orthonormal columns, so A = B^T W (the stored factors are the optimum's)
    np.testing.assert_allclose(basis.B.T @ basis.B, np.eye(K), atol=1e-10)
    np.testing.assert_allclose(basis.A.numpy(), basis.B.numpy().T @ W, atol=1e-9)


@pytest.mark.parametrize("H,D,n", SHAPES)
def test_svd_and_pca_spectra_match_their_applied_errors(H, D, n):
    W, X = make(H, D, n, seed=1)
    C = X @ X.T
    K = min(H, D)
    P, s, Qt = np.linalg.svd(W, full_matrices=False)
    lam, V = np.linalg.eigh(C)
    V = V[:, ::-1]
    svd, pca = svd_basis(t(W), t(C)), pca_basis(t(W), t(C))
    scale = np.trace(W @ C @ W.T)
    for r in range(K + 1):
        ref_svd = measured(W, X, P[:, :r] @ np.diag(s[:r]) @ Qt[:r])
        ref_pca = measured(W, X, W @ V[:, :r] @ V[:, :r].T)
        assert svd.errors[r].item() == pytest.approx(ref_svd, abs=1e-9 * scale)
        assert pca.errors[r].item() == pytest.approx(ref_pca, abs=1e-9 * scale)
        for basis, ref in ((svd, ref_svd), (pca, ref_pca)):
            B, A = truncate(basis.B, basis.A, r)
            assert measured(W, X, (B @ A).numpy()) == pytest.approx(ref, abs=1e-9 * scale)


@pytest.mark.parametrize("H,D,n", SHAPES)
def test_output_is_never_worse_than_svd_pca_learned_or_random(H, D, n):
    W, X = make(H, D, n, seed=2)
    C = X @ X.T
    out, svd, pca = (f(t(W), t(C)) for f in (output_basis, svd_basis, pca_basis))
    tol = 1e-9 * np.trace(W @ C @ W.T)
    assert torch.all(out.errors <= svd.errors + tol)
    assert torch.all(out.errors <= pca.errors + tol)
    rng = np.random.default_rng(3)
    for r in range(1, min(H, D)):
        trained = learn_factors(t(W), t(C), r, TrainSettings(lr=1e-2, max_steps=200))
        assert out.errors[r].item() <= output_error(t(W), t(C), trained.B, trained.A) + tol
        B_rand, A_rand = rng.standard_normal((H, r)), rng.standard_normal((r, D))
        assert out.errors[r].item() <= measured(W, X, B_rand @ A_rand) + tol


def test_rank_deficient_and_empty_inputs_are_safe():
    W, X = make(12, 8, 2, seed=4)  # two tokens: C has rank 2 of 8
    C = X @ X.T
    for f in (output_basis, svd_basis, pca_basis):
        basis = f(t(W), t(C))
        assert torch.isfinite(basis.B).all() and torch.isfinite(basis.A).all()
        assert torch.all(basis.errors >= 0)
    out = output_basis(t(W), t(C))
    # two tokens span a 2-d output space: rank 2 reproduces them exactly
    assert out.errors[2].item() == pytest.approx(0, abs=1e-9 * out.errors[0].item())
    assert gram_eigen(t(C)).values.min() >= 0
    zero = output_basis(t(W), torch.zeros(8, 8, dtype=torch.float64))
    assert torch.all(relative_errors(zero.errors) == 0)


def test_tail_sums_relative_and_fraction_lookup():
    values = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    assert tail_sums(values).tolist() == [10.0, 6.0, 3.0, 1.0, 0.0]
    rel = relative_errors(tail_sums(values)).tolist()
    assert rel == [1.0, 0.6, 0.3, 0.1, 0.0]
    H, D = 8, 8  # rank = floor(p * 64 / 16) = floor(4p)
    assert error_at_fraction(rel, rank_for_fraction(0.5, H, D)) == rel[2]
    assert error_at_fraction(rel, rank_for_fraction(1.0, H, D)) == 0.0
    assert fraction_for_rank(2, H, D) == 0.5


def test_gram_loss_and_gradients_match_autograd_on_the_token_loss():
    """The Gram formulas against float64 autograd of ||W X - B A X||^2 computed from X itself."""
    from sieve_cli.factorize import _loss_and_gradients

    W, X = make(7, 9, 50, seed=6)
    rng = np.random.default_rng(7)
    B, A = rng.standard_normal((7, 3)), rng.standard_normal((3, 9))
    Bt, At = t(B).requires_grad_(True), t(A).requires_grad_(True)
    reference = ((t(W) @ t(X) - Bt @ At @ t(X)) ** 2).sum()
    reference.backward()
    C = t(X @ X.T)
    loss, gB, gA = _loss_and_gradients(t(W), t(W) @ C, C, t(B), t(A))
    assert loss == pytest.approx(reference.item(), rel=1e-10)
    torch.testing.assert_close(gB, Bt.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gA, At.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("H,D,n", SHAPES)
def test_learned_approaches_the_closed_form_optimum_from_above(H, D, n):
    """Full-batch Adam on the Gram loss converges to the optimum numpy's eigenvalues give, never below it."""
    W, X = make(H, D, n, seed=8)
    C = X @ X.T
    eig = np.sort(np.linalg.eigvalsh(W @ C @ W.T))[::-1].clip(min=0)
    total = np.trace(W @ C @ W.T)
    for r in sorted({1, min(H, D) // 2}):
        optimum = eig[r:].sum() / total
        # (settings, relative gap, absolute gap in units of ||W X||^2): the stricter tol, the closer
        for settings, gap, floor in ((TrainSettings(), 1e-2, 1e-3), (TrainSettings(lr=1e-2, tol=1e-5, max_steps=20_000), 1e-4, 1e-6)):
            trained = learn_factors(t(W), t(C), r, settings)
            learned = measured(W, X, trained.B.double().numpy() @ trained.A.double().numpy()) / total
            assert learned >= optimum - 1e-6  # the optimum is global: float32 training cannot beat it
            assert learned <= optimum * (1 + gap) + floor  # and training gets there
            assert trained.relative == pytest.approx(learned, rel=1e-3, abs=1e-6)  # the reported loss is the error
            assert (trained.stopped == "max_steps") == (trained.steps == settings.max_steps) and trained.steps > 0


def test_learned_training_lowers_error_and_starts_from_init():
    W, X = make(10, 12, 200, seed=5)
    C = X @ X.T
    out = output_basis(t(W), t(C))
    r = 4
    B0, A0 = (f.float() for f in truncate(out.B, out.A, r))
    # no steps returns the initial factors unchanged
    start = learn_factors(t(W), t(C), r, TrainSettings(max_steps=0), init=(B0, A0))
    torch.testing.assert_close(start.B, B0) and torch.testing.assert_close(start.A, A0)
    assert start.steps == 0 and start.stopped == "max_steps"
    # started at the optimum, training keeps it (the best iterate is returned)
    kept = learn_factors(t(W), t(C), r, TrainSettings(lr=1e-2), init=(B0, A0))
    assert output_error(t(W), t(C), kept.B, kept.A) <= out.errors[r].item() * (1 + 1e-5)
    few = learn_factors(t(W), t(C), r, TrainSettings(lr=1e-3, max_steps=20, seed=1))
    many = learn_factors(t(W), t(C), r, TrainSettings(lr=1e-3, max_steps=2000, seed=1))
    err_few, err_many = output_error(t(W), t(C), few.B, few.A), output_error(t(W), t(C), many.B, many.A)
    assert err_many < 0.5 * err_few
    assert err_many >= out.errors[r].item() * (1 - 1e-6)
    assert few.B.dtype == torch.float32 and few.B.shape == (10, r) and few.A.shape == (r, 12)
    zero = learn_factors(t(W), t(C), 0)
    assert zero.B.shape == (10, 0) and zero.A.shape == (0, 12) and zero.steps == 0
