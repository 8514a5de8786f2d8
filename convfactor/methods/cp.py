"""CP: a k_h x k_w conv becomes 1x1 (C_in -> R), depthwise k_h x 1, depthwise 1 x k_w, 1x1 (R -> C_out).

Math: W (C_out, C_in, k_h, k_w) ~= sum_r a_r o b_r o c_r o d_r, a rank-R CP decomposition whose factors
are the four stages' filters: b_r (C_in) the first 1x1, c_r (k_h) and d_r (k_w) the depthwise filters of
channel r, a_r (C_out) the last 1x1. A Conv1d is the 3-way case (no d_r).

Exact construction at R_full = prod(dims) / max(dims): index r by the three smallest modes, give those
one-hot factors, and let the largest mode's factor hold the matching fiber of W (every fiber of W along
its largest mode is one term). Below R_full the factors come from CP-ALS in float64, initialized from
the HOSVD (leading singular vectors of each unfolding, completed by seeded random columns where R
exceeds a mode's size), with a fixed sweep budget and a relative tolerance (``_cp_als``). MTTKRPs contract
W with one channel factor at a time (two products of W with an (I, R) matrix per sweep, nothing of size
W * R); the normal equations use the Hadamard product of the factor Gram matrices, and the fit is
tracked with the Gram-matrix identity ||W - W_hat||^2 = ||W||^2 - 2 <W, W_hat> + ||W_hat||^2.

Monotonicity in R (ALS alone is a local optimizer, and a larger R can fit worse): fits are chained
(``RankChain``). The grid ranks ceil(k/20 * R_full) are fitted in order, the first cold (ALS from
the HOSVD), each next one warm-started from the previous fit plus the largest exact terms of its
residual; a rank between grid points starts from the grid fit below it. Every fit is also compared
with the truncated exact construction (its R largest terms; the better is kept). A warm start is
never worse than the fit it extends and ALS never raises the error, so the error is non-increasing
along the grid, and at any R it is at most the error at the grid rank below. Between two ranks of
one grid interval there is no guarantee (measured increases between any adjacent ranks: <= 3e-8 on
random 3x3 layers up to 32->32, where cold ALS alone showed up to 2e-2).
The chain also fits small layers better than cold ALS (mean relative error over all R of a random
6->8 3x3 conv: 0.231 vs 0.245) and a random 128->128 3x3 conv within 2% of it at about the same time.

Energy: CP has no singular-value spectrum, so ``energy`` means the smallest R whose relative squared
reconstruction error is <= 1 - energy, found by bisection (about log2(R_full) probes sharing one
chain; the result always meets the target and R - 1 was probed and missed it).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from ..errors import RankError
from ..geometry import LayerGeometry
from ..ranks import fraction_to_rank
from ._cp_als import DEFAULT_MAX_SWEEPS, DEFAULT_TOLERANCE, CPResult, balance, cp_als
from ._stages import axis_conv, pointwise
from .base import FactorizationMethod, FactorizedLayer, conv_reason, register

__all__ = [
    "CPResult",
    "cp_full_rank",
    "cp_exact_factors",
    "cp_truncated_exact_factors",
    "cp_als",
    "cp_factors",
    "RankChain",
    "CPConv",
    "CP",
    "DEFAULT_MAX_SWEEPS",
    "DEFAULT_WARM_SWEEPS",
    "DEFAULT_TOLERANCE",
    "GRID_STEPS",
]

# A warm-started fit begins near its optimum: a third of the cold budget keeps the chain's time near one
# cold fit's. 20 would fit 3-25% better (relative squared error, random 128->128 3x3) at ~2x the time.
DEFAULT_WARM_SWEEPS = 10
# Ranks ceil(k / GRID_STEPS * R_full) form the warm-start chain (see RankChain).
GRID_STEPS = 20


def cp_full_rank(shape: tuple[int, ...]) -> int:
    """prod(shape) / max(shape): the rank of the exact construction (an upper bound on the CP rank)."""
    return math.prod(shape) // max(shape)


def _exact_terms(tensor: torch.Tensor) -> tuple[int, torch.Tensor, list[torch.Tensor]]:
    """The exact construction's largest mode L, its fibers (I_L, R_full), and one-hot index lists.

    Term r is the fiber tensor[..., :, ...] (mode L free) at the r-th multi-index of the other modes.
    """
    largest = max(range(tensor.dim()), key=lambda n: tensor.shape[n])
    others = [n for n in range(tensor.dim()) if n != largest]
    fibers = tensor.movedim(largest, 0).reshape(tensor.shape[largest], -1)  # (I_L, prod others)
    grids = torch.meshgrid(*[torch.arange(tensor.shape[n]) for n in others], indexing="ij")
    return largest, fibers, [g.reshape(-1) for g in grids]


def _factors_from_terms(tensor: torch.Tensor, largest: int, fibers: torch.Tensor,
                        indices: list[torch.Tensor]) -> list[torch.Tensor]:
    factors: list[torch.Tensor] = []
    others = iter(indices)
    rank = fibers.shape[1]
    for n, size in enumerate(tensor.shape):
        if n == largest:
            factors.append(fibers)
        else:
            one_hot = torch.zeros(size, rank, dtype=tensor.dtype, device=tensor.device)
            one_hot[next(others), torch.arange(rank)] = 1.0
            factors.append(one_hot)
    return balance(factors)


def cp_exact_factors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Exact CP factors of rank ``cp_full_rank(tensor.shape)`` (float64 in, float64 out)."""
    largest, fibers, indices = _exact_terms(tensor)
    return _factors_from_terms(tensor, largest, fibers, indices)


def cp_truncated_exact_factors(tensor: torch.Tensor, rank: int) -> tuple[list[torch.Tensor], float]:
    """The ``rank`` largest terms of the exact construction and their relative squared error.

    The terms have disjoint supports, so the error is the discarded share of ||tensor||^2 and never
    increases with ``rank``.
    """
    largest, fibers, indices = _exact_terms(tensor)
    energy = (fibers**2).sum(dim=0)
    order = torch.argsort(energy, descending=True, stable=True)
    keep = order[:rank]
    total = float(energy.sum())
    # The dropped energy summed directly: 1 - kept/total would leave rounding where nothing is dropped.
    error = 0.0 if total == 0 else float(energy[order[rank:]].sum()) / total
    return _factors_from_terms(tensor, largest, fibers[:, keep], [i[keep] for i in indices]), error


def _tensor_of(weight: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The conv weight as a float64 tensor with its two largest modes first, and that permutation.

    ALS expects the big (channel) modes first; for a long kernel (e.g. 64 x 1) a kernel mode may be
    larger than a channel mode, so the order is by size.
    """
    w = weight.detach().to(torch.float64)
    order = sorted(range(w.dim()), key=lambda n: -w.shape[n])
    order = order[:2] + sorted(order[2:])
    return w.permute(order).contiguous(), order


def _full_tensor(factors: list[torch.Tensor]) -> torch.Tensor:
    """sum_r of the outer products of the factors' columns, via one (I_0, R) @ (R, rest) product."""
    khatri_rao = factors[1]
    for f in factors[2:]:
        khatri_rao = (khatri_rao[:, None, :] * f[None, :, :]).reshape(-1, f.shape[1])  # (prod, R)
    return (factors[0] @ khatri_rao.T).reshape([f.shape[0] for f in factors])


class RankChain:
    """CP fits of one conv weight, each rank warm-started from the grid rank below it.

    The grid is the ranks ceil(k/20 * R_full), k = 1..20 (where fractions in steps of 0.05 land). The
    first grid rank is fitted cold (ALS from the HOSVD); every other rank R starts from the fit at the
    largest grid rank G < R plus the R - G largest exact terms of its residual, which starts at or
    below err(G); ALS never increases the error, and a fit worse than its start is replaced by the
    start. Every fit is also compared with the truncated exact construction (the better is kept).
    Hence err is non-increasing along the grid, err(R) <= err(G), and err(R) <= the truncated
    construction's error at R. Fits are kept, so an energy search reuses the chain.

    Args:
        weight: (C_out, C_in, k_h, k_w) or (C_out, C_in, k).
        max_sweeps: ALS budget of the cold fit; warm_sweeps: of each warm fit.
        tolerance: relative ALS stopping tolerance.
    """

    def __init__(self, weight: torch.Tensor, max_sweeps: int = DEFAULT_MAX_SWEEPS,
                 warm_sweeps: int = DEFAULT_WARM_SWEEPS, tolerance: float = DEFAULT_TOLERANCE):
        self.weight = weight.detach().to(device="cpu", dtype=torch.float64)
        self.tensor, self.order = _tensor_of(self.weight)  # ALS works on the size-ordered tensor
        self.full = cp_full_rank(tuple(self.weight.shape))
        self.grid = sorted({fraction_to_rank(k / GRID_STEPS, self.full) for k in range(1, GRID_STEPS + 1)})
        self.max_sweeps, self.warm_sweeps, self.tolerance = max_sweeps, warm_sweeps, tolerance
        self._fits: dict[int, CPResult] = {}  # factors in the tensor's (size) order

    def fit(self, rank: int) -> CPResult:
        """The rank-``rank`` fit, factors in the weight's mode order (C_out, C_in, k_h[, k_w])."""
        result = self._fit(rank)
        factors: list[torch.Tensor] = [torch.empty(0)] * len(self.order)
        for position, mode in enumerate(self.order):
            factors[mode] = result.factors[position]
        return CPResult(factors, result.relative_squared_error, result.source, result.sweeps)

    def _fit(self, rank: int) -> CPResult:
        if rank in self._fits:
            return self._fits[rank]
        if rank >= self.full:
            result = CPResult(cp_exact_factors(self.tensor), 0.0, "exact")
        else:
            below = [g for g in self.grid if g < rank]
            if below:
                result = self._warm(self._fit(below[-1]), rank)
            else:
                result = self._measured(cp_als(self.tensor, rank, self.max_sweeps, self.tolerance))
            # The truncated construction is closed-form; keeping it as a candidate bounds every fit.
            truncated, truncated_error = cp_truncated_exact_factors(self.tensor, rank)
            if truncated_error < result.relative_squared_error:
                result = CPResult(truncated, truncated_error, "truncated")
        self._fits[rank] = result
        return result

    def _measured(self, result: CPResult) -> CPResult:
        """``result`` with its error computed from the residual (ALS's Gram-identity estimate cancels
        to ~1e-16 of ||W||^2, too coarse to compare near-exact fits)."""
        residual = self.tensor - _full_tensor(result.factors)
        error = float((residual**2).sum()) / max(float((self.tensor**2).sum()), 1e-300)
        return CPResult(result.factors, error, result.source, result.sweeps)

    def _warm(self, start: CPResult, rank: int) -> CPResult:
        residual = self.tensor - _full_tensor(start.factors)
        extra, remaining_share = cp_truncated_exact_factors(residual, rank - start.factors[0].shape[1])
        # The added terms are exact pieces of the residual: the start's error drops by their energy
        # (scaling the start's own reported error keeps the chain's numbers exactly non-increasing).
        start_error = start.relative_squared_error * remaining_share
        initial = [torch.cat([f, e], dim=1) for f, e in zip(start.factors, extra)]
        fitted = self._measured(cp_als(self.tensor, rank, self.warm_sweeps, self.tolerance, initial=initial))
        if fitted.relative_squared_error <= start_error:
            return fitted
        return CPResult(balance(initial), start_error, "warm start", fitted.sweeps)


def cp_factors(
    weight: torch.Tensor,
    rank: int,
    max_sweeps: int = DEFAULT_MAX_SWEEPS,
    tolerance: float = DEFAULT_TOLERANCE,
    warm_sweeps: int = DEFAULT_WARM_SWEEPS,
) -> CPResult:
    """Rank-``rank`` CP factors of a conv weight, one per weight mode, in the weight's mode order.

    Args:
        weight: (C_out, C_in, k_h, k_w) or (C_out, C_in, k).
        rank: R in [1, cp_full_rank(weight.shape)]; R_full gives the exact construction.
        max_sweeps, tolerance, warm_sweeps: the ALS budgets (see ``RankChain``).
    Returns:
        CPResult with factors [(C_out, R), (C_in, R), (k_h, R)[, (k_w, R)]] in float64.
    """
    return RankChain(weight, max_sweeps, warm_sweeps, tolerance).fit(rank)


class CPConv(FactorizedLayer):
    """``project_in`` (1x1, C_in -> R), ``depthwise_h`` (k_h x 1, groups=R), ``depthwise_w`` (1 x k_w,
    groups=R; 2-d only), ``project_out`` (1x1, R -> C_out, with the bias).

    The depthwise stages carry the original stride, padding, dilation and padding_mode of their axis
    (``axis_conv``); the bias-free 1x1 stages commute with every padding mode and with striding.
    """

    method_name = "cp"
    relative_squared_error: float | None = None  # set by CP.decompose; None for a reloaded structure

    @classmethod
    def empty(cls, layer: nn.Module, rank: int) -> CPConv:
        geo = LayerGeometry.of(layer)
        stages = OrderedDict(project_in=pointwise(geo, geo.in_channels, rank, like=layer))
        stages["depthwise_h"] = axis_conv(geo, 0, rank, rank, groups=rank, like=layer)
        if geo.dims == 2:
            stages["depthwise_w"] = axis_conv(geo, 1, rank, rank, groups=rank, like=layer)
        stages["project_out"] = pointwise(geo, rank, geo.out_channels, bias=geo.bias, like=layer)
        return cls(stages, rank, geo)

    def dense_weight(self) -> torch.Tensor:
        b = self.project_in.weight.detach().to(torch.float64).flatten(1)  # (R, C_in)
        c = self.depthwise_h.weight.detach().to(torch.float64).flatten(1)  # (R, k_h)
        a = self.project_out.weight.detach().to(torch.float64).flatten(1)  # (C_out, R)
        if self.geometry.dims == 1:
            return torch.einsum("or,ri,rh->oih", a, b, c)
        d = self.depthwise_w.weight.detach().to(torch.float64).flatten(1)  # (R, k_w)
        return torch.einsum("or,ri,rh,rw->oihw", a, b, c, d)


class CP(FactorizationMethod):
    """Rank-R CP (exact construction at R_full, CP-ALS below) of a conv weight."""

    name = "cp"
    summary = "k_h x k_w -> 1x1 (C_in->R), depthwise k_h x 1, depthwise 1 x k_w, 1x1 (R->C_out); CP-ALS of W"
    rank_meaning = "R: number of CP terms (channels of the depthwise stages); exact at prod(dims)/max(dims)"
    module_cls = CPConv
    rank_components = ("R",)

    def __init__(self, max_sweeps: int = DEFAULT_MAX_SWEEPS, warm_sweeps: int = DEFAULT_WARM_SWEEPS,
                 tolerance: float = DEFAULT_TOLERANCE):
        self.max_sweeps = max_sweeps
        self.warm_sweeps = warm_sweeps
        self.tolerance = tolerance

    def chain(self, layer: nn.Module) -> RankChain:
        """The fits ``decompose`` uses for ``layer``, at any rank (kept between calls on the chain)."""
        return RankChain(layer.weight, self.max_sweeps, self.warm_sweeps, self.tolerance)

    def unsupported_reason(self, layer: nn.Module) -> str | None:
        return conv_reason(self.name, layer, grouped="cp does not factorize grouped convs (groups={groups})",
                           pointwise="a 1x1 conv is a matrix: cp would only add per-channel scales to its SVD "
                                     "(use svd)")

    def full_rank(self, layer: nn.Module) -> int:
        return cp_full_rank(tuple(layer.weight.shape))

    def relative_squared_error(self, layer: nn.Module, rank: int) -> float:
        """||W - W_hat||^2 / ||W||^2 of the rank-``rank`` decomposition ``decompose`` would build."""
        return self.chain(layer).fit(rank).relative_squared_error

    def rank_from_energy(self, layer: nn.Module, energy: float) -> int:
        """Smallest R (by bisection) whose relative squared error is <= 1 - energy.

        Every fit is at least as good as the truncated exact construction, whose error is known in
        closed form, so the search starts below the smallest R at which that construction meets the
        target. The probes share one ``RankChain``. The result always meets the target, and R - 1 was
        probed and missed it (or R = 1); between grid ranks it is the smallest only where the error
        is monotone.
        """
        if not 0.0 < energy <= 1.0:
            raise RankError(f"{self.name}: energy must be in (0, 1], got {energy}")
        chain = self.chain(layer)
        allowed = 1.0 - energy + 1e-12  # slack so that energy=1.0 accepts an exact fit's rounding
        fibers = _exact_terms(chain.weight)[1]
        shares = torch.sort((fibers**2).sum(dim=0), descending=True).values
        total = float(shares.sum())
        if total == 0:
            return 1
        kept = (torch.cumsum(shares, 0) / total).tolist()
        high = next((r + 1 for r, k in enumerate(kept) if k >= energy - 1e-12), chain.full)
        low = 0  # invariant: R=high meets the target; R=low is 0 or was probed and missed it
        while high - low > 1:
            mid = (low + high) // 2
            if chain.fit(mid).relative_squared_error <= allowed:
                high = mid
            else:
                low = mid
        return high

    def decompose(self, layer: nn.Module, rank: int) -> CPConv:
        module = CPConv.empty(layer, rank)
        result = self.chain(layer).fit(rank)
        out_f, in_f, *kernel_f = result.factors  # stage order: C_in, k_h[, k_w], C_out
        module.load_factors([in_f.T, *(f.T for f in kernel_f), out_f], layer)
        module.relative_squared_error = result.relative_squared_error
        return module



register(CP())
