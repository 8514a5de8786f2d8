"""Depthwise + pointwise: a k_h x k_w conv becomes a depthwise conv (multiplier m) then a 1x1 conv.

Math: for each input channel c, the slice S_c = W[:, c] reshaped to (C_out, k_h*k_w) has the SVD
S_c = U_c diag(s_c) V_c^T. Keeping m triplets, channel c gets m depthwise filters, the rows of
sqrt(s) V^T, and the 1x1 conv reads them with the columns of U sqrt(s). Exact when
m = min(C_out, k_h*k_w). Grouped convs are factorized per group: each input channel's slice is then
(C_out/g, k_h*k_w) and the 1x1 conv keeps ``groups``.

Known alternative (not implemented): the m > 1 depthwise conv runs slowly in onnxruntime (its
channel count leaves the 16-channel-block fast path, see benchmarks/methods_speedup.py); the same math
as m multiplier-1 depthwise convs whose outputs are concatenated ran 1.16-1.26x faster there (m=4).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..geometry import LayerGeometry
from ..ranks import shared_rank_spectrum
from ._stages import geometry_conv, pointwise
from .base import FactorizationMethod, FactorizedLayer, conv_reason, register

__all__ = ["channel_slices", "depthwise_factors", "depthwise_spectra", "DepthwisePointwiseConv", "DepthwiseConv",
           "Depthwise"]


def channel_slices(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(C_out, C_in/g, *k) -> (C_in, C_out/g, K): the slice each input channel sees, K = kernel volume: what
    ``depthwise`` truncates (its SVD per channel), read by the scoring as well.

    Input channel c = q * C_in/g + j of group q reads output channels q*C_out/g ... (q+1)*C_out/g - 1.
    """
    c_out, c_in_g = weight.shape[:2]
    w = weight.reshape(groups, c_out // groups, c_in_g, -1)  # (g, O/g, I/g, K)
    return w.permute(0, 2, 1, 3).reshape(groups * c_in_g, c_out // groups, -1)


def depthwise_factors(weight: torch.Tensor, multiplier: int,
                      groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise filters and pointwise weights of multiplier ``multiplier``.

    Args:
        weight: (C_out, C_in/g, *k) conv weight (k of length 1 or 2).
        multiplier: m, 1 <= m <= min(C_out/g, K) with K the kernel volume.
        groups: the conv's ``groups``.
    Returns:
        depthwise: (C_in*m, 1, *k), output channel c*m + j is channel c's j-th filter;
        pointwise: (C_out, C_in/g * m, 1, ...), the weight of a 1x1 conv with ``groups``; both float64.
    """
    w = weight.detach().to(torch.float64)
    c_out, c_in_g = w.shape[:2]
    kernel = tuple(w.shape[2:])
    ones = (1,) * len(kernel)
    u, s, vh = torch.linalg.svd(channel_slices(w, groups), full_matrices=False)
    root = s[:, :multiplier].sqrt()  # (C_in, m)
    filters = vh[:, :multiplier, :] * root[:, :, None]  # (C_in, m, K)
    mixing = u[:, :, :multiplier] * root[:, None, :]  # (C_in, O/g, m)
    depthwise = filters.reshape(-1, 1, *kernel)
    # (C_in, O/g, m) -> (g, I/g, O/g, m) -> (g, O/g, I/g, m) -> (C_out, I/g * m)
    mixing = mixing.reshape(groups, c_in_g, c_out // groups, multiplier).permute(0, 2, 1, 3)
    pointwise_weight = mixing.reshape(c_out, c_in_g * multiplier, *ones)
    return depthwise, pointwise_weight


def depthwise_spectra(weight: torch.Tensor, groups: int = 1) -> np.ndarray:
    """Singular values of every input channel's slice, shape (C_in, min(C_out/g, K))."""
    return torch.linalg.svdvals(channel_slices(weight.detach().to(torch.float64), groups)).cpu().numpy()


class DepthwisePointwiseConv(FactorizedLayer):
    """A depthwise conv with the original geometry (groups=C_in, C_in -> C_in*m) then a 1x1 conv (C_in*m ->
    C_out, groups of the original, with the bias): the module of every method of this form.

    Subclasses name the two stages (``stage_names``): the names are the saved state_dict keys.
    """

    stage_names: ClassVar[tuple[str, str]] = ("depthwise", "pointwise")

    @classmethod
    def empty(cls, layer: nn.Module, rank: int) -> DepthwisePointwiseConv:
        geo = LayerGeometry.of(layer)
        spatial = geometry_conv(geo, geo.in_channels, geo.in_channels * rank, groups=geo.in_channels, like=layer)
        mix = pointwise(geo, geo.in_channels * rank, geo.out_channels, groups=geo.groups, bias=geo.bias,
                        like=layer)
        first, second = cls.stage_names
        return cls(OrderedDict([(first, spatial), (second, mix)]), rank, geo)

    def dense_weight(self) -> torch.Tensor:
        g, m = self.geometry.groups, self.rank
        d = self[0].weight.detach().to(torch.float64)  # (C_in*m, 1, *k)
        p = self[1].weight.detach().to(torch.float64)  # (C_out, C_in/g*m, 1...)
        kernel = tuple(d.shape[2:])
        c_out, c_in = p.shape[0], d.shape[0] // m
        d = d.reshape(g, c_in // g, m, -1)  # (g, I/g, m, K)
        p = p.reshape(g, c_out // g, c_in // g, m)  # (g, O/g, I/g, m)
        w = torch.einsum("goim,gimk->goik", p, d)
        return w.reshape(c_out, c_in // g, *kernel)


class DepthwiseConv(DepthwisePointwiseConv):
    """``depthwise`` (original geometry, groups=C_in, C_in -> C_in*m), then ``pointwise`` (1x1,
    C_in*m -> C_out, groups of the original, with the bias)."""

    method_name = "depthwise"


class Depthwise(FactorizationMethod):
    name = "depthwise"
    summary = "k_h x k_w -> depthwise k_h x k_w (multiplier m), 1x1 (C_in*m->C_out); SVD of each W[:, c]"
    rank_meaning = "m: depthwise filters per input channel (the depthwise multiplier)"
    module_cls = DepthwiseConv
    rank_components = ("m",)

    def unsupported_reason(self, layer: nn.Module) -> str | None:
        return conv_reason(self.name, layer,
                           pointwise="a 1x1 conv: its depthwise part would be a per-channel scale (use svd)")

    def full_rank(self, layer: nn.Module) -> int:
        geo = LayerGeometry.of(layer)
        return min(geo.out_channels // geo.groups, geo.kernel_volume)

    def spectra(self, layer: nn.Module) -> list[np.ndarray]:
        s = depthwise_spectra(layer.weight, layer.groups)
        return [shared_rank_spectrum(s)]

    def decompose(self, layer: nn.Module, rank: int) -> DepthwiseConv:
        return DepthwiseConv.empty(layer, rank).load_factors(depthwise_factors(layer.weight, rank, layer.groups), layer)


register(Depthwise())
