"""Candidate replacements of one layer: (method, rank) over a rank grid, with exact costs and weight errors.

Costs come from ``convfactor.costs.replacement_costs`` (a meta-device build of the candidate, counted the
way the final model is counted), so MACs and parameters are exactly what the factorized model will report.

Weight error is the relative squared reconstruction error ||W - W_hat||^2 / ||W||^2. For methods that
truncate an SVD (spatial_svd, svd, depthwise) it is read off the singular values in closed form, and
for HOSVD Tucker-2 off one transform of the core; grouped layers larger than GROUPED_EXACT_WEIGHTS are
scored by an upper bound from one HOSVD (``GroupedBound``, no grouping search or refinement per rank:
the chosen rank is refined once, when the layer is decomposed); other methods decompose per rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ...decisions import weight_error
from ...errors import RankError
from ...methods.base import FactorizationMethod, Rank
from ...methods.grouped import GroupedBound

__all__ = [
    "FRACTION_GRID",
    "SPECTRAL_METHODS",
    "GROUPED_EXACT_WEIGHTS",
    "grouped_bound",
    "grouped_rank",
    "Option",
    "rank_grid",
    "WeightErrors",
    "rank_to_json",
]

# Fractions of the full rank tried per method: finer where compression is strong (where budgets bite).
FRACTION_GRID = (1 / 32, 1 / 16, 3 / 32, 1 / 8, 3 / 16, 1 / 4, 5 / 16, 3 / 8, 7 / 16, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1.0)
# Methods whose decomposition is a truncated SVD of a reshaped weight: their error is 1 - kept energy.
SPECTRAL_METHODS = ("spatial_svd", "svd", "depthwise", "channel_svd")
# Grouped layers with at most this many weights are scored by their real decomposition (grouping search
# and refinement per rank: well under a second each at 64x64x3x3); larger ones by ``GroupedBound``.
GROUPED_EXACT_WEIGHTS = 1 << 17


def grouped_bound(method: FactorizationMethod, layer: nn.Module) -> GroupedBound | None:
    """A ``GroupedBound`` for a grouped layer too large to decompose per candidate rank, else None."""
    if method.name != "grouped" or layer.weight.numel() <= GROUPED_EXACT_WEIGHTS:
        return None
    return GroupedBound(layer.weight)


def grouped_rank(layer: nn.Module, rank: Rank) -> tuple[int, int, int]:
    """A grouped rank as (groups, r_in, r_out): an int is a group count at the layer's full channels."""
    return (rank, layer.in_channels, layer.out_channels) if isinstance(rank, int) else tuple(rank)


@dataclass
class Option:
    """One way to treat a layer: a (method, rank) replacement, or ``method=None`` for leaving it as is.

    Attributes:
        macs: per sample, all calls of the layer together (None without shapes).
        params: parameters of the replacement (of the layer for "leave as is").
        error2: relative squared error, of the weight (no data) or of the layer output (calibration data).
        loss: the contribution to the allocation objective (``sensitivity * error2``).
        latency_ms: measured time of the replacement alone (latency targets only).
    """

    method: str | None
    rank: Rank | None
    macs: int | None
    params: int
    error2: float = 0.0
    loss: float = 0.0
    latency_ms: float | None = None

    def cost(self, kind: str) -> float:
        """The cost this option adds under a target of ``kind`` (macs, params or latency)."""
        value = {"macs": self.macs, "params": self.params, "latency": self.latency_ms}[kind]
        if value is None:
            raise ValueError(f"option {self.label()} has no {kind} cost")
        return float(value)

    def label(self) -> str:
        return "as is" if self.method is None else f"{self.method}:{_rank_text(self.rank)}"


def _rank_text(rank: Rank | None) -> str:
    return "x".join(map(str, rank)) if isinstance(rank, tuple) else str(rank)


def rank_to_json(rank: Rank | None) -> Any:
    """A rank as it appears in a policy rule (a tuple becomes a list)."""
    return list(rank) if isinstance(rank, tuple) else rank


def rank_grid(
    method: FactorizationMethod,
    layer: nn.Module,
    fractions: Sequence[float] = FRACTION_GRID,
    align: int | None = None,
    extra_ranks: Sequence[Rank] = (),
) -> list[Rank]:
    """Distinct concrete ranks of ``method`` for ``layer``: each fraction of the full rank, plus extras.

    Args:
        fractions: fractions of the full rank (each resolved as a policy's ``rank: f`` would be).
        align: round each rank up to this multiple (as a policy's ``align``), e.g. 8 or 16.
        extra_ranks: further concrete ranks (e.g. a VBMF estimate), aligned the same way.
    Returns:
        Ranks in grid order, each of which ``method.resolve_rank`` maps to itself, so a resolved
        policy rule with that rank reproduces it exactly.
    """
    ranks: list[Rank] = []
    specs: list[Any] = list(fractions) + [rank_to_json(r) for r in extra_ranks]
    for spec in specs:
        try:
            rank = method.resolve_rank(layer, rank=spec, align=align)
            again = method.resolve_rank(layer, rank=rank_to_json(rank))
        except RankError:
            continue
        if again == rank and rank not in ranks:
            ranks.append(rank)
    return ranks


class WeightErrors:
    """Relative squared weight errors ||W - W_hat||^2 / ||W||^2 of one (method, layer), at any rank.

    Closed forms, set up once per layer: for SPECTRAL_METHODS the tail energy of the singular values;
    for tucker2 (plain HOSVD, ``hooi_iterations == 0``) ||W||^2 - ||core||^2, because the core is an
    orthogonal projection of W onto nested subspaces, so one transform by the full bases gives the core
    energy of every (r_in, r_out) as a 2-d cumulative sum. Other methods decompose the layer per rank.
    """

    def __init__(self, method: FactorizationMethod, layer: nn.Module):
        self.method = method
        self.layer = layer
        self._tail: np.ndarray | None = None
        self._core_energy: np.ndarray | None = None
        self._total = 0.0
        self._bound = grouped_bound(method, layer)
        if self._bound is not None:
            pass
        elif method.name in SPECTRAL_METHODS:
            s2 = method.spectra(layer)[0].astype(np.float64) ** 2
            self._total = float(s2.sum())
            self._tail = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])  # tail[r] = sum_{j >= r} s_j^2
        elif method.name == "tucker2" and getattr(method, "hooi_iterations", 0) == 0:
            self._core_energy, self._total = _tucker2_core_energy(layer)

    def __call__(self, rank: Rank) -> float:
        if self._bound is not None:
            return float(max(0.0, 1.0 - self._bound.kept(grouped_rank(self.layer, rank))))
        if self._total == 0 and (self._tail is not None or self._core_energy is not None):
            return 0.0
        if self._tail is not None:
            return float(max(0.0, self._tail[min(int(rank), len(self._tail) - 1)] / self._total))
        if self._core_energy is not None:
            r_in, r_out = rank
            if (r_in + 1, r_out + 1) == self._core_energy.shape:
                return 0.0  # both bases square orthogonal: exact (1 - ratio would leave rounding ~1e-16)
            return float(max(0.0, 1.0 - self._core_energy[r_in, r_out] / self._total))
        return weight_error(self.layer, self.method.decompose(self.layer, rank)) ** 2


def _tucker2_core_energy(layer: nn.Module) -> tuple[np.ndarray, float]:
    """E[r_in, r_out] = ||core||^2 of the HOSVD truncation at (r_in, r_out) (summed over groups), ||W||^2."""
    g = layer.groups
    w = layer.weight.detach().to(torch.float64)
    w = w.reshape(g, w.shape[0] // g, w.shape[1], -1)  # (g, O, I, K)
    _, o, i, k = w.shape
    mode0 = w.reshape(g, o, i * k)
    mode1 = w.permute(0, 2, 1, 3).reshape(g, i, o * k)
    # Eigenvectors of the Gram matrices span the same leading subspaces as the unfoldings' left
    # singular vectors (the decomposition's bases), complete even when a mode exceeds the other sizes.
    u_out = torch.linalg.eigh(mode0 @ mode0.transpose(1, 2))[1].flip(-1)  # (g, O, O)
    u_in = torch.linalg.eigh(mode1 @ mode1.transpose(1, 2))[1].flip(-1)  # (g, I, I)
    core2 = torch.einsum("goik,gor,gis->grsk", w, u_out, u_in).pow(2).sum(dim=(0, 3))  # (O, I), all groups
    energy = np.zeros((i + 1, o + 1))
    energy[1:, 1:] = core2.T.cumsum(0).cumsum(1).numpy()  # [r_in, r_out]
    return energy, float((w**2).sum())

