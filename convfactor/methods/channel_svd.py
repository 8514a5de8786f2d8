"""Channel SVD (AIMET's weight SVD, Zhang et al. 2015, "basis filters"): a k x k conv becomes a k x k conv
C_in -> r followed by a 1x1 conv r -> C_out.

Math: reshape W (C_out, C_in/g, *k) to M (C_out, C_in/g * K) per group, K the kernel volume; M = U S V^T;
keep r triplets. The first stage's r filters (the basis filters) are the rows of sqrt(S) V^T reshaped
to kernels, with the layer's own stride, padding, dilation and padding_mode; the 1x1 stage mixes them
with U sqrt(S) and carries the bias. Exact at r = min(C_out/g, C_in/g * K). A 1x1 conv is plain svd.

The first stage has no bias, so a padded border pixel leaves it as whatever the padding gave (zero for
zero padding, copied pixels otherwise) and the 1x1 stage is a per-pixel linear map of it, exactly as the
original layer computed the border.
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

__all__ = ["channel_svd_factors", "channel_svd_spectra", "ChannelSVDConv", "ChannelSVD"]


def _as_matrices(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(C_out, C_in/g, *k) -> (g, C_out/g, C_in/g * K), the patch order of the layer's receptive field."""
    return weight.reshape(groups, weight.shape[0] // groups, -1)


def channel_svd_factors(weight: torch.Tensor, rank: int, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Basis filters and their 1x1 mixing weights of rank ``rank`` per group.

    Args:
        weight: (C_out, C_in/g, *k) conv weight.
        rank: singular triplets kept per group, 1 <= rank <= min(C_out/g, C_in/g * K).
        groups: the conv's ``groups``.
    Returns:
        basis: (g*r, C_in/g, *k), mixing: (C_out, r, 1[, 1]), both float64.
    """
    w = weight.detach().to(torch.float64)
    c_out, c_in_g = w.shape[:2]
    kernel = tuple(w.shape[2:])
    u, s, vh = torch.linalg.svd(_as_matrices(w, groups), full_matrices=False)
    root = s[:, :rank].sqrt()
    basis = vh[:, :rank, :] * root[:, :, None]  # (g, r, D)
    mixing = u[:, :, :rank] * root[:, None, :]  # (g, C_out/g, r)
    return basis.reshape(groups * rank, c_in_g, *kernel), mixing.reshape(c_out, rank, *((1,) * len(kernel)))


def channel_svd_spectra(weight: torch.Tensor, groups: int = 1) -> np.ndarray:
    """Singular values of each group's (C_out/g, C_in/g * K) matrix."""
    return torch.linalg.svdvals(_as_matrices(weight.detach().to(torch.float64), groups)).cpu().numpy()


class ChannelSVDConv(FactorizedLayer):
    """``basis`` (the original k x k geometry, C_in -> g*r) then ``mixing`` (1x1, g*r -> C_out, with the bias)."""

    method_name = "channel_svd"

    @classmethod
    def empty(cls, layer: nn.Module, rank: int) -> ChannelSVDConv:
        geo = LayerGeometry.of(layer)
        g = geo.groups
        basis = geometry_conv(geo, geo.in_channels, g * rank, groups=g, like=layer)
        mixing = pointwise(geo, g * rank, geo.out_channels, groups=g, bias=geo.bias, like=layer)
        return cls(OrderedDict(basis=basis, mixing=mixing), rank, geo)

    def dense_weight(self) -> torch.Tensor:
        g, r = self.geometry.groups, self.rank
        basis = self.basis.weight.detach().to(torch.float64)  # (g*r, C_in/g, *k)
        mixing = self.mixing.weight.detach().to(torch.float64)  # (C_out, r, 1...)
        c_out = mixing.shape[0]
        w = torch.bmm(mixing.reshape(g, c_out // g, r), basis.reshape(g, r, -1))  # (g, C_out/g, D)
        return w.reshape(c_out, *basis.shape[1:])


class ChannelSVD(FactorizationMethod):
    name = "channel_svd"
    summary = "k_h x k_w -> (k_h x k_w, C_in->r) then (1x1, r->C_out); SVD of W as (C_out, C_in*k_h*k_w)"
    rank_meaning = ("r: basis filters, the channels between the k x k and the 1x1 conv (per group); exact at "
                    "min(C_out/g, C_in/g*k_h*k_w)")
    module_cls = ChannelSVDConv
    rank_components = ("r",)

    def unsupported_reason(self, layer: nn.Module) -> str | None:
        return conv_reason(self.name, layer, pointwise="a 1x1 conv: channel SVD of it is svd")

    def full_rank(self, layer: nn.Module) -> int:
        geo = LayerGeometry.of(layer)
        g = geo.groups
        return min(geo.out_channels // g, geo.in_channels // g * geo.kernel_volume)

    def spectra(self, layer: nn.Module) -> list[np.ndarray]:
        return [shared_rank_spectrum(channel_svd_spectra(layer.weight, layer.groups))]

    def decompose(self, layer: nn.Module, rank: int) -> ChannelSVDConv:
        return ChannelSVDConv.empty(layer, rank).load_factors(channel_svd_factors(layer.weight, rank, layer.groups),
                                                              layer)


register(ChannelSVD())
