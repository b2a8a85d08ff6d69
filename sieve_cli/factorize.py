"""The math of `sieve fit`: per-matrix low-rank bases and their output-error spectra. No I/O.

Every method approximates a matrix W (H x D) by B_R A_R with B_R: H x R, A_R: R x D, and is
judged by the output error on task data, err(R) = ||W X - B_R A_R X||_F^2 = tr(E C E^T) with
E = W - B_R A_R and C = X X^T the captured (uncentred) input second moment.

- `output`: the exact optimum (reduced-rank regression). With W C W^T = U diag(l) U^T, l
  descending, B = U, A = U^T W, and err(R) = sum of the discarded eigenvalues.
- `svd`: truncated SVD of W alone (task-blind).
- `pca`: W V_R V_R^T with V_R the top eigenvectors of C (projects the inputs).
- `learned`: the paper's two free factors trained by Adam, here full batch on the exact loss
  tr(E C E^T) computed from C (so on every calibration token, not a sample of rows).

The closed-form methods return a `Basis`: the full ordered basis (K = min(H, D) columns of B,
rows of A; rank R is a slice) and the absolute error at every rank 0..K, all in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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


def error_at_fraction(relative: list[float | None], level: int | None) -> float | None:
    """The relative error at a target's level for a kept fraction (`Matrix.level_for`: a rank; a
    WidthUnit's: a width); 0.0 at None (kept whole)."""
    if level is None:
        return 0.0
    return relative[level] if level < len(relative) else None


def _symmetric(M: torch.Tensor) -> torch.Tensor:
    # eigh reads one triangle; averaging removes the asymmetry that float products leave.
    return (M + M.T) / 2


# ---- learned: the paper's two free factors, trained by Adam on the exact loss -------------


@dataclass(frozen=True)
class TrainSettings:
    """How `learn_factors` trains: Adam, full batch, until the loss stops falling.

    The stopping rule: every `window` steps, if the best relative output error so far fell by
    less than `tol` of itself over the window, the run has reached a plateau. On a plateau
    the learning rate is divided by 10, up to `decays` times; the next plateau (or
    `max_steps`) ends the run. Constant-rate Adam hovers around the optimum at a distance
    set by the rate, so the decays are what let it settle; `decays=0` is the paper's constant
    rate. The rate is the paper's: 10x higher converges faster on some matrices (SmolLM2 block
    3 q at half its parameters: 1.03x the optimum's error after 1,000 steps, where 1e-3 is at
    1.97x) but stalls on others (block 15 o at 0.9 kept: 2.91x after 5,000 steps, 1e-3 1.64x).
    """

    lr: float = 1e-3
    max_steps: int = 5_000
    tol: float = 1e-3
    window: int = 100
    decays: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.max_steps < 0 or self.tol < 0 or self.window < 1 or self.decays < 0:
            raise ValueError("lr must be > 0, max_steps, tol and decays >= 0, window >= 1")


@dataclass
class Trained:
    """Factors from `learn_factors`, with how they were reached."""

    B: torch.Tensor  # H x R, float32
    A: torch.Tensor  # R x D, float32
    steps: int  # Adam steps taken
    relative: float  # the best training loss (the returned factors'): relative output error, in float32
    stopped: str  # "plateau", "max_steps" or "exact" (rank 0 or a zero output)


def random_factors(out_features: int, in_features: int, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear's default initialisation for the two thin maps (uniform, bound 1/sqrt(fan_in))."""
    A = (torch.rand(rank, in_features, generator=generator, dtype=torch.float32) * 2 - 1) / math.sqrt(in_features)
    B = (torch.rand(out_features, rank, generator=generator, dtype=torch.float32) * 2 - 1) / math.sqrt(max(rank, 1))
    return B, A


def learn_factors(
    W: torch.Tensor,
    C: torch.Tensor,
    rank: int,
    settings: TrainSettings = TrainSettings(),
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Trained:
    """Train B (H x R) and A (R x D) by full-batch Adam on the exact loss tr(E C E^T), E = W - B A.

    This is ||W X - B A X||_F^2 over every calibration token, computed from the Gram C = X X^T
    alone; it is scaled by tr(W C W^T) so the loss is the relative output error (Adam's steps
    do not depend on that scale). Runs in float32 on W's device. `init` is a starting (B, A)
    (e.g. the `output` optimum); without it the factors start random, as in the paper.
    """
    device = W.device
    H, D = W.shape
    generator = torch.Generator().manual_seed(settings.seed)
    B0, A0 = init if init is not None else random_factors(H, D, rank, generator)
    B = B0.detach().to(device, torch.float32).clone()
    A = A0.detach().to(device, torch.float32).clone()
    total = output_total(W, C)
    if rank == 0 or total <= 0:
        return Trained(B, A, 0, 1.0 if total > 0 else 0.0, "exact")
    W32 = W.detach().to(device, torch.float32)
    C32 = (C.to(device, F64) / total).to(torch.float32)
    WC = W32 @ C32
    B.requires_grad_(True)
    A.requires_grad_(True)
    optimizer = torch.optim.Adam([B, A], lr=settings.lr)
    plateau = _Plateau(settings)
    best = (math.inf, B.detach().clone(), A.detach().clone())
    step, stopped = 0, "max_steps"
    while True:
        loss, gB, gA = _loss_and_gradients(W32, WC, C32, B.detach(), A.detach())
        if loss < best[0]:  # Adam need not descend monotonically: keep the best iterate
            best = (loss, B.detach().clone(), A.detach().clone())
        if step == settings.max_steps:
            break
        if plateau.reached(step, best[0]):
            if plateau.decays_left == 0:
                stopped = "plateau"
                break
            plateau.decays_left -= 1
            for group in optimizer.param_groups:
                group["lr"] /= 10
        B.grad, A.grad = gB, gA
        optimizer.step()
        step += 1
    loss, B, A = best
    return Trained(B, A, step, loss, stopped)


def _loss_and_gradients(W, WC, C, B, A) -> tuple[float, torch.Tensor, torch.Tensor]:
    """tr(E C E^T) and its gradients in B and A, with E = W - B A and WC = W C precomputed.

    G = E C = W C - B (A C) costs R D^2 + H R D, never H D^2; the loss is sum(W * G) -
    sum(B * (G A^T)), reusing G A^T, which the gradient in B needs anyway.
    """
    G = WC - B @ (A @ C)
    GAt = G @ A.T
    loss = float((W * G).sum() - (B * GAt).sum())
    return loss, -2 * GAt, -2 * (B.T @ G)


class _Plateau:
    """The stopping rule of `TrainSettings`: the loss fell by less than tol of itself in a window."""

    def __init__(self, settings: TrainSettings) -> None:
        self.window, self.tol, self.decays_left = settings.window, settings.tol, settings.decays
        self.mark: float | None = None

    def reached(self, step: int, loss: float) -> bool:
        if step % self.window:
            return False
        previous, self.mark = self.mark, loss
        return previous is not None and previous - loss < self.tol * abs(loss)


__all__ = [
    "Basis",
    "GramEigen",
    "TrainSettings",
    "Trained",
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
