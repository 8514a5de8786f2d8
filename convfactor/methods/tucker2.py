"""Tucker-2: a k x k conv becomes 1x1 (C_in -> r_in), k x k core (r_in -> r_out), 1x1 (r_out -> C_out).

Math: W (C_out, C_in, *k) ~= G x_0 U_out x_1 U_in with orthonormal U_out (C_out, r_out) and
U_in (C_in, r_in), core G = W x_0 U_out^T x_1 U_in^T (r_out, r_in, *k). U_out and U_in are the leading
left singular vectors of the mode-0 (C_out, C_in*K) and mode-1 (C_in, C_out*K) unfoldings (HOSVD),
optionally refined by HOOI (off by default, see DEFAULT_HOOI_ITERATIONS). Exact at (r_in, r_out) =
(C_in, C_out): both U are then square orthogonal. Grouped convs are factorized per group (ranks and
full rank per group); all three stages keep ``groups``.

Rank specs: (r_in, r_out); an int r means (min(r, C_in/g), min(r, C_out/g)); a fraction f means
(ceil(f*C_in/g), ceil(f*C_out/g)); ``energy`` picks each mode's rank from its unfolding's spectrum.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from ..geometry import LayerGeometry
from ..ranks import shared_rank_spectrum
from ._stages import geometry_conv, pointwise
from .base import FactorizationMethod, FactorizedLayer, conv_reason, register

__all__ = [
    "DEFAULT_HOOI_ITERATIONS",
    "tucker2_factors",
    "tucker2_spectra",
    "Tucker2Conv",
    "Tucker2",
]

# Plain HOSVD by default: its subspaces are nested, so the error never increases with r_in or r_out,
# which a rank search can rely on. HOOI lowered the relative error by only ~0.3-0.5% (64-channel 3x3
# and small random weights) and breaks that monotonicity by up to 2e-3; pass hooi_iterations to use it.
DEFAULT_HOOI_ITERATIONS = 0


def _grouped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(C_out, C_in/g, *k) -> (g, C_out/g, C_in/g, K) with K the kernel volume."""
    c_out, c_in_g = weight.shape[:2]
    return weight.reshape(groups, c_out // groups, c_in_g, -1)


def _mode0(w: torch.Tensor) -> torch.Tensor:
    """Output-channel unfolding: (g, O, I, K) -> (g, O, I*K)."""
    g, o, i, k = w.shape
    return w.reshape(g, o, i * k)


def _mode1(w: torch.Tensor) -> torch.Tensor:
    """Input-channel unfolding: (g, O, I, K) -> (g, I, O, K) -> (g, I, O*K)."""
    g, o, i, k = w.shape
    return w.permute(0, 2, 1, 3).reshape(g, i, o * k)


def _leading_left_vectors(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal (g, m, rank): the ``rank`` leading left singular vectors of each (m, n) matrix.

    When rank > n the SVD has only n vectors, so the basis is completed by the full SVD (cheap in
    exactly that case, as n < m there) to keep a square orthogonal factor at full rank.
    """
    m, n = matrix.shape[-2:]
    u, _, _ = torch.linalg.svd(matrix, full_matrices=rank > min(m, n))
    return u[..., :rank]


def tucker2_factors(
    weight: torch.Tensor,
    rank: tuple[int, int],
    groups: int = 1,
    hooi_iterations: int = DEFAULT_HOOI_ITERATIONS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 factors of a conv weight, per group.

    Args:
        weight: (C_out, C_in/g, *k) conv weight (k of length 1 or 2).
        rank: (r_in, r_out) per group, 1 <= r_in <= C_in/g, 1 <= r_out <= C_out/g.
        groups: the conv's ``groups``.
        hooi_iterations: HOOI sweeps after the HOSVD initialization (0: plain HOSVD).
    Returns:
        project_in: (g*r_in, C_in/g, 1, ...), core: (g*r_out, r_in, *k), project_out: (C_out, r_out, 1, ...),
        float64, each shaped as the weight of its conv stage.
    """
    r_in, r_out = rank
    w = _grouped(weight.detach().to(torch.float64), groups)  # (g, O, I, K)
    g, o, i, _ = w.shape
    kernel = tuple(weight.shape[2:])
    ones = (1,) * len(kernel)
    u_out = _leading_left_vectors(_mode0(w), r_out)  # (g, O, r_out)
    u_in = _leading_left_vectors(_mode1(w), r_in)  # (g, I, r_in)
    for _ in range(hooi_iterations):
        # Each half-step is the best U for the other one fixed, so the fit never gets worse.
        u_in = _leading_left_vectors(_mode1(torch.einsum("goik,gor->grik", w, u_out)), r_in)
        u_out = _leading_left_vectors(_mode0(torch.einsum("goik,gis->gosk", w, u_in)), r_out)
    core = torch.einsum("goik,gor,gis->grsk", w, u_out, u_in)  # (g, r_out, r_in, K)
    project_in = u_in.transpose(1, 2).reshape(g * r_in, i, *ones)
    core = core.reshape(g * r_out, r_in, *kernel)
    project_out = u_out.reshape(g * o, r_out, *ones)
    return project_in, core, project_out


def tucker2_spectra(weight: torch.Tensor, groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Singular values of the mode-1 (input) and mode-0 (output) unfoldings, shapes (g, .) each."""
    w = _grouped(weight.detach().to(torch.float64), groups)
    return (torch.linalg.svdvals(_mode1(w)).cpu().numpy(), torch.linalg.svdvals(_mode0(w)).cpu().numpy())


class Tucker2Conv(FactorizedLayer):
    """``project_in`` (1x1, C_in -> g*r_in), ``core`` (original geometry, g*r_in -> g*r_out),
    ``project_out`` (1x1, g*r_out -> C_out, with the bias).

    The 1x1 stages have no bias, so they map zeros to zeros and commute with zero padding; they act
    per pixel, so they also commute with reflect/replicate/circular padding and with striding. The
    core therefore takes the original stride, padding (including 'same'), dilation and padding_mode.
    """

    method_name = "tucker2"

    @classmethod
    def empty(cls, layer: nn.Module, rank: tuple[int, int]) -> Tucker2Conv:
        geo = LayerGeometry.of(layer)
        g = geo.groups
        r_in, r_out = rank
        project_in = pointwise(geo, geo.in_channels, g * r_in, groups=g, like=layer)
        core = geometry_conv(geo, g * r_in, g * r_out, groups=g, like=layer)
        project_out = pointwise(geo, g * r_out, geo.out_channels, groups=g, bias=geo.bias, like=layer)
        return cls(OrderedDict(project_in=project_in, core=core, project_out=project_out), tuple(rank), geo)

    def dense_weight(self) -> torch.Tensor:
        g = self.geometry.groups
        p_in = self.project_in.weight.detach().to(torch.float64)
        core = self.core.weight.detach().to(torch.float64)
        p_out = self.project_out.weight.detach().to(torch.float64)
        kernel = tuple(core.shape[2:])
        u_in = p_in.reshape(g, -1, p_in.shape[1])  # (g, r_in, I)
        c = core.reshape(g, -1, core.shape[1], int(np.prod(kernel)))  # (g, r_out, r_in, K)
        u_out = p_out.reshape(g, -1, p_out.shape[1])  # (g, O, r_out)
        w = torch.einsum("gor,grsk,gsi->goik", u_out, c, u_in)  # (g, O, I, K)
        return w.reshape(p_out.shape[0], p_in.shape[1], *kernel)


class Tucker2(FactorizationMethod):
    """Tucker-2 (HOSVD + ``hooi_iterations`` HOOI sweeps) of the channel modes of a conv weight."""

    name = "tucker2"
    summary = "k x k -> 1x1 (C_in->r_in), k x k core (r_in->r_out), 1x1 (r_out->C_out); HOSVD/HOOI of W"
    rank_meaning = (
        "(r_in, r_out): channels after the first 1x1 and after the core (per group); "
        "an int r means (min(r, C_in/g), min(r, C_out/g))"
    )
    module_cls = Tucker2Conv
    rank_components = ("r_in", "r_out")

    def __init__(self, hooi_iterations: int = DEFAULT_HOOI_ITERATIONS):
        self.hooi_iterations = hooi_iterations

    def unsupported_reason(self, layer: nn.Module) -> str | None:
        return conv_reason(self.name, layer)

    def reduces_to(self, layer: nn.Module) -> str | None:
        # On a 1x1 kernel U_out C U_in^T has rank min(r_in, r_out); svd of that rank is at least as close
        # (the best of that rank) and cheaper (no r_in x r_out core, no wider factor).
        return "svd" if LayerGeometry.of(layer).kernel_volume == 1 else None

    def full_rank(self, layer: nn.Module) -> tuple[int, int]:
        geo = LayerGeometry.of(layer)
        return geo.in_channels // geo.groups, geo.out_channels // geo.groups

    def broadcast_int_rank(self, layer: nn.Module, value: int, component: int) -> int:
        # An int is capped per mode so that e.g. rank 64 works for a 32 -> 128 conv; anything else
        # (bool, str, float) passes through for check_rank to reject with its message.
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            return value
        return min(int(value), self.full_rank(layer)[component])

    def spectra(self, layer: nn.Module) -> list[np.ndarray]:
        # All groups share (r_in, r_out): the j-th energy of a mode is summed over the groups.
        s_in, s_out = tucker2_spectra(layer.weight, layer.groups)
        return [shared_rank_spectrum(s_in), shared_rank_spectrum(s_out)]

    def decompose(self, layer: nn.Module, rank: tuple[int, int]) -> Tucker2Conv:
        return Tucker2Conv.empty(layer, rank).load_factors(
            tucker2_factors(layer.weight, tuple(rank), layer.groups, self.hooi_iterations), layer)



register(Tucker2())
