"""CP-ALS of a 3- or 4-way float64 tensor (the solver ``convfactor.methods.cp`` chains over ranks).

Initialized from the HOSVD (leading singular vectors of each unfolding, completed by seeded random columns
where R exceeds a mode's size), with a fixed sweep budget and a relative tolerance. MTTKRPs contract the
tensor with one channel factor at a time (two products of W with an (I, R) matrix per sweep, nothing of
size W * R); the normal equations use the Hadamard product of the factor Gram matrices, and the fit is
tracked with the Gram-matrix identity ||W - W_hat||^2 = ||W||^2 - 2 <W, W_hat> + ||W_hat||^2.
TensorLy's ``parafac`` was measured against it and not adopted (README, "CP solver").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["CPResult", "cp_als", "column_scales", "balance", "DEFAULT_MAX_SWEEPS", "DEFAULT_TOLERANCE"]

# ALS converges slowly on conv weights: relative squared error of a random 64x64x3x3 at R=128 is 0.312,
# 0.289, 0.271 after 20, 50, 200 sweeps. One sweep of a 512x512x3x3 at R=512 costs ~0.23 s of one core,
# so 30 sweeps keep that layer near 7 s.
DEFAULT_MAX_SWEEPS = 30
# Stop when a sweep lowers the relative squared error by less than this fraction of itself (relative,
# so that an exactly low-rank weight keeps converging towards 0 instead of stopping near 1e-6).
DEFAULT_TOLERANCE = 1e-4
_SEED = 0


@dataclass
class CPResult:
    """Factors of a CP decomposition and the relative squared error of the fit.

    ``factors[n]`` is (I_n, R) for mode n of the tensor; scales are spread evenly over the modes.
    """

    factors: list[torch.Tensor]
    relative_squared_error: float
    source: str  # 'exact', 'als' or 'truncated' (the truncated exact construction won)
    sweeps: int = 0  # ALS sweeps run


def column_scales(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-mode column scales that give every mode's column r the same norm, lambda_r ** (1/N).

    Multiplying each factor by its scales leaves the CP tensor unchanged and keeps float32 copies of
    the factors (and the ALS Gram matrices) in range; zero columns stay zero.
    """
    norms = torch.stack([f.norm(dim=0) for f in factors])  # (N, R)
    target = norms.prod(dim=0) ** (1.0 / len(factors))
    return [torch.where(n > 0, target / torch.where(n > 0, n, 1.0), 0.0) for n in norms]


def balance(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The factors rescaled by ``column_scales``."""
    return [f * scale for f, scale in zip(factors, column_scales(factors))]


def _initial_factors(tensor: torch.Tensor, rank: int) -> list[torch.Tensor]:
    """HOSVD initialization, nested in ``rank``: leading left singular vectors of each unfolding
    (scaled by their singular values), then seeded random columns beyond the mode size."""
    generator = torch.Generator().manual_seed(_SEED)
    factors = []
    for n, size in enumerate(tensor.shape):
        unfolding = tensor.movedim(n, 0).reshape(size, -1)  # (I_n, prod others)
        # Eigen-decomposition of the (I_n, I_n) Gram matrix: cheaper than an SVD of the wide unfolding.
        evals, evecs = torch.linalg.eigh(unfolding @ unfolding.T)
        order = torch.argsort(evals, descending=True)
        keep = order[: min(rank, size)]
        scale = evals[keep].clamp(min=0).sqrt()
        lead = evecs[:, keep] * scale
        # Rows of a (rank, I_n) draw, so that the first columns are the same for every rank (nesting).
        extra = torch.randn(rank, size, generator=generator, dtype=torch.float64).T[:, lead.shape[1]:]
        typical = float(scale.mean()) if scale.numel() else 1.0
        factors.append(torch.cat([lead, extra.to(tensor) * typical / math.sqrt(size)], dim=1))
    return factors


def _solve_normal(gram: torch.Tensor, mttkrp: torch.Tensor) -> torch.Tensor:
    """A with A @ gram = mttkrp for a symmetric PSD ``gram`` (R, R); pseudo-inverse when singular."""
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return torch.cholesky_solve(mttkrp.T, chol).T
    return mttkrp @ torch.linalg.pinv(gram, hermitian=True)


def _contract_small(z: torch.Tensor, factors: list[torch.Tensor], modes: list[int]) -> torch.Tensor:
    """Contract axes ``modes`` of z (..., R) with the matching factors, column by column (rank r kept)."""
    for axis, f in sorted(zip(modes, factors), key=lambda t: -t[0]):
        shape = [1] * z.dim()
        shape[axis], shape[-1] = f.shape
        z = (z * f.reshape(shape)).sum(dim=axis)
    return z


def cp_als(
    tensor: torch.Tensor,
    rank: int,
    max_sweeps: int = DEFAULT_MAX_SWEEPS,
    tolerance: float = DEFAULT_TOLERANCE,
    initial: list[torch.Tensor] | None = None,
) -> CPResult:
    """CP-ALS of a 3- or 4-way float64 tensor whose two largest modes come first.

    Each sweep updates mode 0, then mode 1, then the small modes. The two large MTTKRPs are products
    of an unfolding with one factor, (I_0 or I_1, rest) @ (., R); the small modes reuse the second.

    Args:
        tensor: (I_0, I_1, S_1[, S_2]) float64.
        rank: number of terms R >= 1.
        max_sweeps: sweep budget.
        tolerance: stop when a sweep lowers the relative squared error by less than this fraction
            of it.
        initial: starting factors (I_n, R); default the HOSVD initialization.
    Returns:
        CPResult with factors (I_n, R) and the relative squared error of the last sweep.
    """
    dims = tensor.shape
    n_modes = tensor.dim()
    total = float((tensor**2).sum())
    if total == 0:
        return CPResult([torch.zeros(s, rank, dtype=tensor.dtype) for s in dims], 0.0, "als")
    factors = _initial_factors(tensor, rank) if initial is None else [f.clone() for f in initial]
    # (I_0, I_1, S...) -> (I_1, S..., I_0) and (I_0, S..., I_1): unfoldings with the contracted mode last.
    rest_of_0 = tensor.movedim(0, -1).contiguous()
    rest_of_1 = tensor.movedim(1, -1).contiguous()
    small = list(range(2, n_modes))
    error, previous, sweeps = 1.0, math.inf, 0
    grams = [f.T @ f for f in factors]
    for sweeps in range(1, max_sweeps + 1):  # noqa: B007 (the count is returned)
        # Mode 0: contract mode 1, then the small modes.  (I_0, S..., R)
        z = (rest_of_1.reshape(-1, dims[1]) @ factors[1]).reshape(dims[0], *dims[2:], rank)
        m = _contract_small(z, [factors[n] for n in small], [n - 1 for n in small])
        del z
        factors[0] = _solve_normal(math.prod(grams[n] for n in range(n_modes) if n != 0), m)
        grams[0] = factors[0].T @ factors[0]
        # Mode 1: contract mode 0 (new), then the small modes.  (I_1, S..., R)
        z = (rest_of_0.reshape(-1, dims[0]) @ factors[0]).reshape(dims[1], *dims[2:], rank)
        m = _contract_small(z, [factors[n] for n in small], [n - 1 for n in small])
        factors[1] = _solve_normal(math.prod(grams[n] for n in range(n_modes) if n != 1), m)
        grams[1] = factors[1].T @ factors[1]
        # Small modes: contract mode 1 of z once (it does not depend on the small factors).
        t = (z * factors[1].reshape(dims[1], *([1] * len(small)), rank)).sum(dim=0)  # (S..., R)
        del z
        for n in small:
            others = [k for k in small if k != n]
            m = _contract_small(t, [factors[k] for k in others], [k - 2 for k in others])
            m = m.reshape(dims[n], rank) if not others else m
            factors[n] = _solve_normal(math.prod(grams[k] for k in range(n_modes) if k != n), m)
            grams[n] = factors[n].T @ factors[n]
        # Fit from the last update: <W, W_hat> = sum(M * A_n), ||W_hat||^2 = sum(prod of all Grams).
        inner = float((m * factors[small[-1]]).sum())
        model = float(math.prod(grams).sum())
        error = max(0.0, (total - 2 * inner + model) / total)
        # Balance the column norms so the Gram matrices stay well conditioned; rescale the Grams to match.
        scales = column_scales(factors)
        factors = [f * c for f, c in zip(factors, scales)]
        grams = [g * torch.outer(c, c) for g, c in zip(grams, scales)]
        if previous - error < tolerance * error:
            break
        previous = error
    return CPResult(factors, error, "als", sweeps)


