"""The math of structured width pruning: which units of a module to keep, and the refit. No I/O.

A module's inner width is cut by whole units: an MLP's intermediate neurons (a row of gate/up
and a column of down each), or an attention module's key/value groups (a KV head with its
query heads: rows of q/k/v and a block of o's columns). What the cut leaves is one matrix W
(H x D, D = units x unit_size: down or o) reading fewer inputs. With G the captured Gram of
W's input (ridge-regularised, G_r = G + lam I), the output error of keeping the column set S
with the remaining columns refit is minimised by W'_S = W G_r[:, S] G_r[S, S]^-1.

Order: structured OBS. With H^-1 = G_r^-1, the error added by removing unit J (its b columns),
the rest re-optimised, is tr(W_J [H^-1_JJ]^-1 W_J^T); remove the cheapest, update the rest
(W -= W_J [H^-1_JJ]^-1 H^-1_J,:), downdate H^-1 the same way, repeat. One pass gives every
width at once, nested. Cost: O(D^3) per module (D^2 per removal), `batch` removals per step.

Refit at every width from one factorisation: put the columns in keep order and let
L L^T = G_r[cols][:, cols] (Cholesky). The leading block of L is the Cholesky of every leading
block, so with M = W[:, cols] L the refit at k kept columns is M[:, :k] L[:k, :k]^-1 and its
error is ||M[:, k:]||_F^2: the stored `M` and `Linv` give any width by slicing, as an
eigenbasis gives any rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

F64 = torch.float64
RIDGE = 1e-4  # of the Gram's mean diagonal: keeps G_r invertible where a unit never fires


@dataclass
class WidthBasis:
    """Every width of one module: `order[:w]` are the units width w keeps (most needed first)."""

    order: torch.Tensor  # units, int64
    M: torch.Tensor  # H x D: W's columns in keep order, times L
    Linv: torch.Tensor  # D x D lower triangular: L^-1
    errors: torch.Tensor  # units + 1, float64: absolute output error at width 0..units
    unit_size: int

    @property
    def units(self) -> int:
        return int(self.order.numel())

    def columns(self, width: int) -> torch.Tensor:
        """The input columns (of the dense matrix) that width `width` keeps, in keep order."""
        return unit_columns(self.order[:width], self.unit_size)

    def refit(self, width: int) -> torch.Tensor:
        """The least-squares refit (H x width * unit_size) of the kept columns, in `columns` order."""
        k = width * self.unit_size
        return self.M[:, :k].to(F64) @ self.Linv[:k, :k].to(F64)

    def relative(self) -> torch.Tensor:
        total = self.errors[0]
        return self.errors / total if total > 0 else torch.zeros_like(self.errors)


def unit_columns(units: torch.Tensor, size: int) -> torch.Tensor:
    """Column indices of `units` (each `size` consecutive columns), unit by unit."""
    return (units[:, None] * size + torch.arange(size)[None, :]).reshape(-1)


def ridged(G: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    G = G.to(F64)
    G = (G + G.T) / 2
    scale = G.diagonal().mean().item()
    return G + (ridge * scale if scale > 0 else 1.0) * torch.eye(G.shape[0], dtype=F64, device=G.device)


def removal_order(W: torch.Tensor, G: torch.Tensor, unit_size: int = 1, batch: int = 1) -> torch.Tensor:
    """Units in the order greedy structured OBS removes them (cheapest first); G already ridged.

    `batch` > 1 removes that many of the cheapest units per step with one joint update (the
    lazy variant for very wide modules: D^3 / batch work in the loop instead of D^3).
    """
    W = W.to(F64).clone()
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(G))
    if unit_size == 1 and batch == 1:
        return _removal_order_single(W, Hinv)
    units = W.shape[1] // unit_size
    alive = torch.ones(units, dtype=torch.bool)
    removed: list[int] = []
    while len(removed) < units:
        candidates = alive.nonzero().flatten()
        cost = removal_costs(W, Hinv, candidates, unit_size)
        take = candidates[torch.argsort(cost, stable=True)[: min(batch, len(candidates))]]
        cols = unit_columns(take, unit_size)
        if len(removed) + len(take) < units:  # the last removal needs no update
            X = torch.linalg.inv(_sym(Hinv[cols][:, cols]))
            row = Hinv[cols, :]
            W -= (W[:, cols] @ X) @ row
            Hinv -= Hinv[:, cols] @ X @ row
        alive[take] = False
        removed.extend(int(j) for j in take)
    return torch.tensor(removed, dtype=torch.int64)


def _removal_order_single(W: torch.Tensor, Hinv: torch.Tensor) -> torch.Tensor:
    """The exact greedy pass one neuron at a time, with in-place rank-1 updates (no copies per step).

    The squared column norms of W are kept up to date from one W^T w product per step instead of
    being recomputed, so a step costs one gemv on W and one rank-1 update each of W and H^-1.
    """
    n = W.shape[1]
    norms = W.square().sum(0)
    dead = torch.zeros(n, dtype=torch.bool)
    removed = []
    for step in range(n):
        cost = norms / Hinv.diagonal()
        cost[dead] = float("inf")
        j = int(torch.argmin(cost))
        removed.append(j)
        dead[j] = True
        if step == n - 1:
            break
        d = Hinv[j, j].item()
        a = Hinv[j].clone() / d  # the update's row: W -= w_j a, H^-1 -= h_j a
        w = W[:, j].clone()
        v = W.T.mv(w)
        norms.add_(a * (a * w.dot(w) - 2 * v))
        W.addr_(w, a, alpha=-1.0)
        Hinv.addr_(Hinv[:, j].clone(), a, alpha=-1.0)
    return torch.tensor(removed, dtype=torch.int64)


def removal_costs(W: torch.Tensor, Hinv: torch.Tensor, units: torch.Tensor, size: int) -> torch.Tensor:
    """tr(W_J [H^-1_JJ]^-1 W_J^T) for each unit J in `units`: the error its removal adds."""
    if size == 1:
        return W[:, units].square().sum(0) / Hinv.diagonal()[units]
    cols = unit_columns(units, size).reshape(len(units), size)
    blocks = Hinv[cols[:, :, None], cols[:, None, :]]  # n x b x b
    WJ = W[:, cols].permute(1, 0, 2)  # n x H x b
    return (torch.linalg.solve(_sym(blocks), WJ.transpose(1, 2)) * WJ.transpose(1, 2)).sum(dim=(1, 2))


def width_basis(W: torch.Tensor, G: torch.Tensor, unit_size: int = 1, batch: int = 1,
                ridge: float = RIDGE) -> WidthBasis:
    """The keep order, refit factors and error at every width of W (H x D) on input Gram G (D x D)."""
    W = W.to(F64)
    Gr = ridged(G.to(W.device), ridge)
    keep = removal_order(W, Gr, unit_size, batch).flip(0)
    cols = unit_columns(keep, unit_size)
    L = torch.linalg.cholesky(Gr[cols][:, cols])
    M = W[:, cols] @ L
    Linv = torch.linalg.solve_triangular(L, torch.eye(L.shape[0], dtype=F64, device=L.device), upper=False)
    per_unit = M.square().sum(0).reshape(-1, unit_size).sum(1)
    tail = torch.cat([per_unit.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=F64, device=M.device)])
    return WidthBasis(order=keep.cpu(), M=M, Linv=Linv, errors=tail.cpu(), unit_size=unit_size)


def obs_batch(units: int) -> int:
    """Removals per OBS step: exact greedy up to 4096 units, then about 4096 steps in all."""
    return max(1, -(-units // 4096))


def _sym(A: torch.Tensor) -> torch.Tensor:
    return (A + A.transpose(-1, -2)) / 2
