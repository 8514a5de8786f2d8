"""SVD of a 1x1 conv or a Linear: W (C_out, C_in) ~= (U_r sqrt(S_r)) (sqrt(S_r) V_r^T), two layers.

Math: the ``first`` layer (C_in -> r) has weight sqrt(S_r) V_r^T, the ``second`` (r -> C_out) has
U_r sqrt(S_r) and the bias. Exact at r = min(C_in, C_out). Grouped 1x1 convs are factorized per group
(both stages keep ``groups``). k x k kernels are left to spatial_svd and tucker2.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from ..geometry import LayerGeometry, layer_kind
from ..ranks import shared_rank_spectrum
from ._stages import geometry_conv, pointwise
from .base import ALREADY_DEPTHWISE, FactorizationMethod, FactorizedLayer, register

__all__ = ["svd_factors", "svd_spectra", "SVDLayer", "SVD"]


def _as_matrices(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(C_out, C_in/g[, 1, 1]) -> (g, C_out/g, C_in/g)."""
    c_out, c_in_g = weight.shape[:2]
    return weight.reshape(groups, c_out // groups, c_in_g)


def svd_factors(weight: torch.Tensor, rank: int, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor a Linear or 1x1 conv weight into two matrices of rank ``rank`` per group.

    Args:
        weight: (C_out, C_in) Linear weight or (C_out, C_in/g, 1[, 1]) 1x1 conv weight.
        rank: singular triplets kept per group, 1 <= rank <= min(C_in/g, C_out/g).
        groups: the conv's ``groups`` (1 for Linear).
    Returns:
        first: (g*r, C_in/g), second: (C_out, r), float64 (reshape to the stage's weight shape).
    """
    w = _as_matrices(weight.detach().to(torch.float64), groups)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:, :rank].sqrt()
    first = vh[:, :rank, :] * root[:, :, None]  # (g, r, C_in/g)
    second = u[:, :, :rank] * root[:, None, :]  # (g, C_out/g, r)
    return first.reshape(groups * rank, w.shape[2]), second.reshape(groups * w.shape[1], rank)


def svd_spectra(weight: torch.Tensor, groups: int = 1) -> np.ndarray:
    """Singular values of each group's matrix, shape (g, min(C_in/g, C_out/g))."""
    return torch.linalg.svdvals(_as_matrices(weight.detach().to(torch.float64), groups)).cpu().numpy()


class SVDLayer(FactorizedLayer):
    """``first`` (C_in -> g*r, no bias) then ``second`` (g*r -> C_out, with the bias).

    For a conv, ``first`` keeps the original stride, padding, dilation and padding_mode and
    ``second`` is a plain 1x1. Border pixels still come out equal to the bias: a zero-padded pixel is
    zero after ``first`` (no bias), so ``second`` maps it to exactly its bias, as the original did.
    Reflect/replicate/circular padding copies pixels, which commutes with any per-pixel linear map.
    """

    method_name = "svd"

    @classmethod
    def empty(cls, layer: nn.Module, rank: int) -> SVDLayer:
        geo = LayerGeometry.of(layer)
        g = geo.groups
        if geo.kind == "Linear":
            first = pointwise(geo, geo.in_channels, rank, like=layer)
        else:
            first = geometry_conv(geo, geo.in_channels, g * rank, groups=g, like=layer)
        second = pointwise(geo, g * rank, geo.out_channels, groups=g, bias=geo.bias, like=layer)
        return cls(OrderedDict(first=first, second=second), rank, geo)

    def dense_weight(self) -> torch.Tensor:
        g, r = self.geometry.groups, self.rank
        first = self.first.weight.detach().to(torch.float64)
        second = self.second.weight.detach().to(torch.float64)
        c_out, c_in_g = second.shape[0], first.shape[1]
        a = first.reshape(g, r, c_in_g)
        b = second.reshape(g, c_out // g, r)
        w = torch.bmm(b, a).reshape(c_out, c_in_g)  # (g, C_out/g, C_in/g) -> (C_out, C_in/g)
        return w if self.geometry.kind == "Linear" else w.reshape(c_out, c_in_g, *self.geometry.kernel)


class SVD(FactorizationMethod):
    name = "svd"
    summary = "1x1 conv / Linear W -> (C_in->r) then (r->C_out); truncated SVD of W (C_out, C_in)"
    rank_meaning = "r: channels (features) between the two layers (per group)"
    module_cls = SVDLayer
    rank_components = ("r",)

    def unsupported_reason(self, layer: nn.Module) -> str | None:
        kind = layer_kind(layer)
        if kind is None:
            return f"svd factorizes 1x1 Conv1d/Conv2d and Linear, not {type(layer).__name__}"
        geo = LayerGeometry.of(layer)
        if not geo.is_pointwise:
            return "svd needs a 1x1 conv or Linear; use spatial_svd/tucker2 for k x k"
        if geo.is_depthwise:
            return ALREADY_DEPTHWISE
        return None

    def full_rank(self, layer: nn.Module) -> int:
        geo = LayerGeometry.of(layer)
        return min(geo.in_channels, geo.out_channels) // geo.groups

    def spectra(self, layer: nn.Module) -> list[np.ndarray]:
        s = svd_spectra(layer.weight, LayerGeometry.of(layer).groups)
        return [shared_rank_spectrum(s)]

    def decompose(self, layer: nn.Module, rank: int) -> SVDLayer:
        module = SVDLayer.empty(layer, rank)
        return module.load_factors(svd_factors(layer.weight, rank, module.geometry.groups), layer)



register(SVD())
