"""Spatial SVD: a k_h x k_w conv becomes a (k_h x 1, C_in -> r) conv then a (1 x k_w, r -> C_out) conv.

Math: reshape W (C_out, C_in, k_h, k_w) to M (C_in*k_h, C_out*k_w); M = U S V^T; keep r singular
triplets. The first stage's filters are columns of U sqrt(S), the second's rows of sqrt(S) V^T.
Exact when r = min(C_in*k_h, C_out*k_w). A Conv1d is a k x 1 kernel: (k, C_in -> r) then 1x1.
Grouped convs are factorized per group (both stages keep ``groups``).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from ..geometry import LayerGeometry
from ..ranks import shared_rank_spectrum
from ._stages import axis_conv, pointwise
from .base import FactorizationMethod, FactorizedLayer, conv_reason, register

__all__ = ["spatial_svd_factors", "SpatialSVDConv", "SpatialSVD"]


def _as_matrices(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(C_out, C_in/g, k_h[, k_w]) -> (g, C_in/g * k_h, C_out/g * k_w); a 1-d kernel has k_w = 1."""
    if weight.dim() == 3:
        weight = weight.unsqueeze(-1)
    c_out, c_in_g, k_h, k_w = weight.shape
    w = weight.reshape(groups, c_out // groups, c_in_g, k_h, k_w)
    # (g, C_out/g, C_in/g, k_h, k_w) -> (g, C_in/g, k_h, C_out/g, k_w)
    w = w.permute(0, 2, 3, 1, 4)
    return w.reshape(groups, c_in_g * k_h, (c_out // groups) * k_w)


def spatial_svd_factors(weight: torch.Tensor, rank: int, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor a conv weight into vertical and horizontal filters of rank ``rank`` per group.

    Args:
        weight: (C_out, C_in/g, k_h, k_w) or (C_out, C_in/g, k) conv weight.
        rank: singular triplets kept per group, 1 <= rank <= min(C_in/g * k_h, C_out/g * k_w).
        groups: the conv's ``groups``.
    Returns:
        vertical: (g*r, C_in/g, k_h, 1) (or (g*r, C_in/g, k) for 1-d),
        horizontal: (C_out, r, 1, k_w) (or (C_out, r, 1) for 1-d), both float64.
    """
    one_d = weight.dim() == 3
    w = weight.detach().to(torch.float64)
    c_out, c_in_g, k_h = w.shape[:3]
    k_w = 1 if one_d else w.shape[3]
    u, s, vh = torch.linalg.svd(_as_matrices(w, groups), full_matrices=False)
    root = s[:, :rank].sqrt()
    first = u[:, :, :rank] * root[:, None, :]  # (g, C_in/g*k_h, r)
    second = vh[:, :rank, :] * root[:, :, None]  # (g, r, C_out/g*k_w)
    # (g, C_in/g, k_h, r) -> (g, r, C_in/g, k_h) -> (g*r, C_in/g, k_h, 1)
    vertical = first.reshape(groups, c_in_g, k_h, rank).permute(0, 3, 1, 2).reshape(groups * rank, c_in_g, k_h, 1)
    # (g, r, C_out/g, k_w) -> (g, C_out/g, r, k_w) -> (C_out, r, 1, k_w)
    horizontal = second.reshape(groups, rank, c_out // groups, k_w).permute(0, 2, 1, 3).reshape(c_out, rank, 1, k_w)
    if one_d:
        return vertical.squeeze(-1), horizontal.squeeze(-1)
    return vertical, horizontal


def spatial_svd_spectra(weight: torch.Tensor, groups: int = 1) -> np.ndarray:
    """Singular values of each group's reshaped weight, shape (g, min(C_in/g*k_h, C_out/g*k_w))."""
    s = torch.linalg.svdvals(_as_matrices(weight.detach().to(torch.float64), groups))
    return s.cpu().numpy()


class SpatialSVDConv(FactorizedLayer):
    """``vertical`` (k_h x 1, C_in -> g*r) then ``horizontal`` (1 x k_w, g*r -> C_out, with the bias)."""

    method_name = "spatial_svd"

    @classmethod
    def empty(cls, layer: nn.Module, rank: int) -> SpatialSVDConv:
        geo = LayerGeometry.of(layer)
        g = geo.groups
        vertical = axis_conv(geo, 0, geo.in_channels, g * rank, groups=g, like=layer)
        if geo.dims == 1:
            horizontal = pointwise(geo, g * rank, geo.out_channels, groups=g, bias=geo.bias, like=layer)
        else:
            horizontal = axis_conv(geo, 1, g * rank, geo.out_channels, groups=g, bias=geo.bias, like=layer)
        return cls(OrderedDict(vertical=vertical, horizontal=horizontal), rank, geo)

    def dense_weight(self) -> torch.Tensor:
        g, r = self.geometry.groups, self.rank
        v = self.vertical.weight.detach().to(torch.float64)
        h = self.horizontal.weight.detach().to(torch.float64)
        if v.dim() == 3:  # 1-d: (g*r, C_in/g, k) and (C_out, r, 1)
            v, h = v.unsqueeze(-1), h.unsqueeze(-2)
        c_out = h.shape[0]
        v = v.reshape(g, r, v.shape[1], v.shape[2])  # (g, r, C_in/g, k_h)
        h = h.reshape(g, c_out // g, r, h.shape[-1])  # (g, C_out/g, r, k_w)
        w = torch.einsum("gria,gorb->goiab", v, h)
        w = w.reshape(c_out, v.shape[2], v.shape[3], h.shape[-1])
        return w.squeeze(-1) if self.geometry.dims == 1 else w


class SpatialSVD(FactorizationMethod):
    name = "spatial_svd"
    summary = "k_h x k_w -> (k_h x 1, C_in->r) then (1 x k_w, r->C_out); SVD of W as (C_in*k_h, C_out*k_w)"
    rank_meaning = "r: channels between the k_h x 1 and the 1 x k_w conv (per group)"
    module_cls = SpatialSVDConv
    rank_components = ("r",)

    def unsupported_reason(self, layer: nn.Module) -> str | None:
        return conv_reason(self.name, layer)

    def reduces_to(self, layer: nn.Module) -> str | None:
        # A 1x1 kernel's (1 x 1, C_in->r) then (1 x 1, r->C_out) is svd's pair of the same cost.
        return "svd" if LayerGeometry.of(layer).kernel_volume == 1 else None

    def full_rank(self, layer: nn.Module) -> int:
        geo = LayerGeometry.of(layer)
        g = geo.groups
        k_w = 1 if geo.dims == 1 else geo.kernel[1]
        return min(geo.in_channels // g * geo.kernel[0], geo.out_channels // g * k_w)

    def spectra(self, layer: nn.Module) -> list[np.ndarray]:
        s = spatial_svd_spectra(layer.weight, layer.groups)
        return [shared_rank_spectrum(s)]

    def decompose(self, layer: nn.Module, rank: int) -> SpatialSVDConv:
        return SpatialSVDConv.empty(layer, rank).load_factors(
            spatial_svd_factors(layer.weight, rank, layer.groups), layer)



register(SpatialSVD())
