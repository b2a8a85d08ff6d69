"""The math of `sieve fit`: per-matrix low-rank bases and their output-error spectra. No I/O.

Every method approximates a matrix W (H x D) by B_R A_R with B_R: H x R, A_R: R x D, and is
judged by the output error on task data, err(R) = ||W X - B_R A_R X||_F^2 = tr(E C E^T) with
E = W - B_R A_R and C = X X^T the captured (uncentred) input second moment.

- `output`: the exact optimum (reduced-rank regression). With W C W^T = U diag(l) U^T, l
  descending, B = U, A = U^T W, and err(R) = sum of the discarded eigenvalues.
- `svd`: truncated SVD of W alone (task-blind).
- `pca`: W V_R V_R^T with V_R the top eigenvectors of C (projects the inputs).
- `learned`: the paper's two free factors trained by Adam on sampled input rows.

The closed-form methods return a `Basis`: the full ordered basis (K = min(H, D) columns of B,
rows of A; rank R is a slice) and the absolute error at every rank 0..K, all in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .lowrank import rank_for_fraction

F64 = torch.float64


@dataclass
class Basis:
    """A full ordered basis: rank R is (B[:, :R], A[:R]); errors[r] is err(r) for r = 0..K."""

    B: torch.Tensor  # H x K
    A: torch.Tensor  # K x D
    errors: torch.Tensor  # K + 1, float64, absolute output error at each rank

    @property
    def rank_limit(self) -> int:
        return self.B.shape[1]

    def relative(self) -> torch.Tensor:
        return relative_errors(self.errors)


@dataclass
class GramEigen:
    """C = V diag(values) V^T with values descending and clipped at 0 (C may be rank-deficient)."""

    values: torch.Tensor  # D
    vectors: torch.Tensor  # D x D

    def root(self) -> torch.Tensor:
        """R with R R^T = C (D x D), so that W C W^T = (W R)(W R)^T."""
        return self.vectors * self.values.sqrt()


def gram_eigen(C: torch.Tensor) -> GramEigen:
    """Eigen-decomposition of the input second moment, safe for a rank-deficient C."""
    values, vectors = torch.linalg.eigh(_symmetric(C.to(F64)))
    # Rounding leaves eigenvalues of a PSD matrix slightly negative; they are zero.
    return GramEigen(values.flip(0).clamp_min(0), vectors.flip(1))


def output_basis(W: torch.Tensor, C: torch.Tensor, eigen: GramEigen | None = None) -> Basis:
    """The exact optimum of ||W X - W_R X||^2 for every R: the eigenbasis of W C W^T.

    When H <= D this is an H x H eigen-decomposition. When H > D (an MLP up-projection) the
    same basis comes from the SVD of W C^(1/2) (H x D): its left singular vectors are the
    eigenvectors of W C W^T and its squared singular values the eigenvalues, which avoids
    an H x H problem. `eigen` (of C) may be passed to share it between matrices of one site.
    """
    W = W.to(F64)
    H, D = W.shape
    if H <= D:
        values, U = torch.linalg.eigh(_symmetric(W @ C.to(F64, copy=False) @ W.T))
        values, U = values.flip(0).clamp_min(0), U.flip(1)
    else:
        eigen = eigen or gram_eigen(C)
        U, singular, _ = torch.linalg.svd(W @ eigen.root(), full_matrices=False)
        values = singular.square()  # descending already
    return Basis(B=U, A=U.T @ W, errors=tail_sums(values))


def svd_basis(W: torch.Tensor, C: torch.Tensor) -> Basis:
    """Truncated SVD of W (ignores C), with its output error on C at every rank.

    W = P S Q^T, B = P, A = S Q^T; E_R = sum_{i>=R} s_i p_i q_i^T and the p_i are orthonormal,
    so err(R) = sum_{i>=R} s_i^2 q_i^T C q_i.
    """
    W = W.to(F64)
    P, s, Qt = torch.linalg.svd(W, full_matrices=False)
    per_direction = s.square() * ((Qt @ C.to(F64)) * Qt).sum(dim=1)
    return Basis(B=P, A=s[:, None] * Qt, errors=tail_sums(per_direction))


def pca_basis(W: torch.Tensor, C: torch.Tensor, eigen: GramEigen | None = None) -> Basis:
    """W V_R V_R^T with V_R the top-R eigenvectors of C: B = W V, A = V^T.

    E_R = W V_{>R} V_{>R}^T, so err(R) = sum_{i>=R} c_i ||W v_i||^2 (over all D directions:
    at R = K < D the error need not be zero).
    """
    W = W.to(F64)
    K = min(W.shape)
    eigen = eigen or gram_eigen(C)
    WV = W @ eigen.vectors
    per_direction = eigen.values * WV.square().sum(dim=0)
    return Basis(B=WV[:, :K], A=eigen.vectors[:, :K].T, errors=tail_sums(per_direction)[: K + 1])




def truncate(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-R factors of a full ordered basis."""
    if not 0 <= rank <= B.shape[1]:
        raise ValueError(f"rank {rank} is outside 0..{B.shape[1]}")
    return B[:, :rank], A[:rank]


def output_error(W: torch.Tensor, C: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> float:
    """tr((W - B A) C (W - B A)^T): the output error of given factors, measured in float64."""
    E = W.to(F64) - B.to(F64) @ A.to(F64)
    return float(((E @ C.to(F64)) * E).sum())


def output_total(W: torch.Tensor, C: torch.Tensor) -> float:
    """tr(W C W^T) = ||W X||^2: the denominator of the relative error."""
    W = W.to(F64)
    return float(((W @ C.to(F64)) * W).sum())


def tail_sums(values: torch.Tensor) -> torch.Tensor:
    """t[r] = sum_{i >= r} values[i] for r = 0..n (t[n] = 0), summing small terms first."""
    zero = values.new_zeros(1)
    return torch.cat([values.flip(0).cumsum(0).flip(0), zero])


def relative_errors(errors: torch.Tensor) -> torch.Tensor:
    """err(r) / err(0); a matrix whose output is zero on the task loses nothing (all zeros)."""
    total = errors[0]
    if total <= 0:
        return torch.zeros_like(errors)
    return errors / total


def error_at_fraction(relative: list[float | None], p: float, out_features: int, in_features: int) -> float | None:
    """The relative error of the rank that keeps a fraction p (0.0 when p keeps the matrix dense)."""
    rank = rank_for_fraction(p, out_features, in_features)
    if rank is None:
        return 0.0
    return relative[rank] if rank < len(relative) else None


def _symmetric(M: torch.Tensor) -> torch.Tensor:
    # eigh reads one triangle; averaging removes the asymmetry that float products leave.
    return (M + M.T) / 2


# ---- learned: the paper's procedure ----------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    lr: float = 1e-3
    epochs: int = 2
    batch_rows: int = 5000
    seed: int = 0


def random_factors(out_features: int, in_features: int, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear's default initialisation for the two thin maps (uniform, bound 1/sqrt(fan_in))."""
    A = (torch.rand(rank, in_features, generator=generator, dtype=torch.float32) * 2 - 1) / math.sqrt(in_features)
    B = (torch.rand(out_features, rank, generator=generator, dtype=torch.float32) * 2 - 1) / math.sqrt(max(rank, 1))
    return B, A


def learn_factors(
    W: torch.Tensor,
    samples: torch.Tensor,
    rank: int,
    settings: TrainSettings = TrainSettings(),
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train B (H x R) and A (R x D) by Adam so that B A x reconstructs y = W x on the samples.

    Runs in float32 on W's device. `init` is a starting (B, A) (e.g. the `output` basis);
    without it the factors start random, as in the paper. Returns float32 tensors.
    """
    device = W.device
    W = W.detach().to(torch.float32)
    H, D = W.shape
    generator = torch.Generator().manual_seed(settings.seed)
    if rank == 0:
        return W.new_zeros(H, 0), W.new_zeros(0, D)
    B0, A0 = init if init is not None else random_factors(H, D, rank, generator)
    B = B0.detach().to(device, torch.float32).clone().requires_grad_(True)
    A = A0.detach().to(device, torch.float32).clone().requires_grad_(True)
    X = samples.to(device, torch.float32)
    with torch.no_grad():
        Y = X @ W.T
    optimizer = torch.optim.Adam([B, A], lr=settings.lr)
    for _ in range(settings.epochs):
        order = torch.randperm(X.shape[0], generator=generator).to(device)
        for batch in order.split(settings.batch_rows):
            x, y = X[batch], Y[batch]
            loss = torch.nn.functional.mse_loss((x @ A.T) @ B.T, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return B.detach(), A.detach()


__all__ = [
    "Basis",
    "GramEigen",
    "TrainSettings",
    "error_at_fraction",
    "gram_eigen",
    "learn_factors",
    "output_basis",
    "output_error",
    "output_total",
    "pca_basis",
    "random_factors",
    "relative_errors",
    "svd_basis",
    "tail_sums",
    "truncate",
]
