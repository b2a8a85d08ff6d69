"""Structured width pruning math against float64 brute force."""

import itertools

import torch

from sieve_cli.width import removal_order, ridged, unit_columns, width_basis

F64 = torch.float64


def problem(H=5, units=6, size=1, tokens=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = units * size
    X = torch.randn(D, tokens, generator=g, dtype=F64) * torch.linspace(0.2, 2.0, D, dtype=F64)[:, None]
    W = torch.randn(H, D, generator=g, dtype=F64)
    return W, X @ X.T


def ls_refit(W, G, cols):
    """W G[:, S] G[S, S]^-1 for the column set S, and its output error tr(E G E^T)."""
    cols = torch.as_tensor(cols, dtype=torch.int64)
    refit = W @ G[:, cols] @ torch.linalg.inv(G[cols][:, cols])
    E = W.clone()
    E[:, cols] -= refit
    return refit, torch.trace(E @ G @ E.T).item()


def test_greedy_order_removes_the_exhaustively_cheapest_unit_each_time():
    for size in (1, 3):
        W, G = problem(size=size)
        Gr = ridged(G)
        order = removal_order(W, Gr, size).tolist()
        alive = list(range(6))
        for unit in order[:-1]:
            costs = {}
            for j in alive:
                kept = [u for u in alive if u != j]
                costs[j] = ls_refit(W, Gr, unit_columns(torch.tensor(kept), size))[1]
            assert unit == min(costs, key=costs.get), (size, unit, costs)
            alive.remove(unit)


def test_every_width_equals_a_separate_least_squares_fit():
    for size in (1, 2):
        W, G = problem(size=size, units=5)
        basis = width_basis(W, G, size)
        Gr = ridged(G)
        for width in range(basis.units + 1):
            cols = basis.columns(width)
            assert sorted(cols.tolist()) == sorted(set(cols.tolist()))
            if width:
                expected, error = ls_refit(W, Gr, cols)
                assert torch.allclose(basis.refit(width), expected, atol=1e-9, rtol=1e-9)
            else:
                error = torch.trace(W @ Gr @ W.T).item()
            assert abs(basis.errors[width].item() - error) < 1e-8 * max(1.0, error)
        assert basis.errors[-1].item() < 1e-9 and (basis.errors[:-1] >= basis.errors[1:] - 1e-12).all()


def test_nested_widths_contain_each_other_and_greedy_is_optimal_for_one_removal():
    W, G = problem(units=6)
    basis = width_basis(W, G)
    Gr = ridged(G)
    for width in range(1, basis.units):
        assert set(basis.columns(width).tolist()) <= set(basis.columns(width + 1).tolist())
    best = min(ls_refit(W, Gr, list(c))[1] for c in itertools.combinations(range(6), 5))
    assert abs(basis.errors[5].item() - best) < 1e-9 * best


def test_lazy_batches_keep_the_refit_exact_at_every_width():
    W, G = problem(units=8)
    basis = width_basis(W, G, batch=3)
    Gr = ridged(G)
    for width in (2, 5, 7):
        expected, _ = ls_refit(W, Gr, basis.columns(width))
        assert torch.allclose(basis.refit(width), expected, atol=1e-9)


def test_a_unit_that_never_fires_goes_first():
    W, G = problem(units=5)
    G[2, :] = 0
    G[:, 2] = 0  # neuron 2 is always zero on the task: removing it costs nothing
    assert width_basis(W, G).order[-1].item() == 2
