"""Per-kernel shift attention (the course's SAL / SAL2, Hacene et al., post-training): keep m taps of every
k x k kernel slice W[o, c, :], zero the rest. An unstructured-pruning form: the layer stays one conv.

Math: for each (o, c) the m taps t with the largest W[o, c, t]^2 are kept (with calibration data: the
largest output energy W[o, c, t]^2 * E[p_(c, t)^2], and the kept values refit by least squares on the
data, one solve per output channel, see ``convfactor.auto.fits.taps``). m = 1 is SAL (every kernel
a single shifted tap), m = 2 SAL2. Exact at m = k_h * k_w: nothing is zeroed.

The module is the original conv with the zeroed weight (same geometry, groups and bias), so it exports
and runs as the original does: a dense runtime gains no time from the zeros. They count in the
challenge score as unstructured pruning (p_u = zeros / parameters, measured on the produced model);
``kept_fraction`` is the share of the weight's entries kept (m / (k_h k_w)). The zeros are structural:
``SALConv.structural_zeros`` names them (all but the m largest-magnitude taps of every slice), and
``convfactor.auto.finetune`` masks their gradients and keeps them zero, so a fine-tuned SAL model is still one.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from ..geometry import LayerGeometry
from ._stages import geometry_conv
from .base import FactorizationMethod, FactorizedLayer, conv_reason, register

__all__ = ["kernel_tap_mask", "sal_weight", "SALConv", "SAL"]


def kernel_tap_mask(score: torch.Tensor, m: int) -> torch.Tensor:
    """Boolean mask (O, I, T): per (o, c) slice of ``score`` (O, I, T), its ``m`` largest entries (ties to
    the lower tap index)."""
    order = torch.argsort(-score, dim=-1, stable=True)[..., :m]
    mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    return mask.scatter_(-1, order, True)


def sal_weight(weight: torch.Tensor, m: int) -> torch.Tensor:
    """The weight (float64, the layer's shape) with all but the ``m`` largest-magnitude taps of every
    kernel slice set to zero."""
    w = weight.detach().to(torch.float64)
    flat = w.reshape(w.shape[0], w.shape[1], -1)
    return (flat * kernel_tap_mask(flat**2, m)).reshape(w.shape)


class SALConv(FactorizedLayer):
    """``conv``: the original layer's geometry, with m nonzero taps per kernel slice."""

    method_name = "sal"

    @classmethod
    def empty(cls, layer: nn.Module, rank: int) -> SALConv:
        geo = LayerGeometry.of(layer)
        conv = geometry_conv(geo, geo.in_channels, geo.out_channels, groups=geo.groups, bias=geo.bias,
                             like=layer)
        return cls(OrderedDict(conv=conv), rank, geo)

    @property
    def kept_fraction(self) -> float:
        """Share of the weight's entries kept, m / (k_h k_w)."""
        return self.rank / self.geometry.kernel_volume

    def dense_weight(self) -> torch.Tensor:
        return self.conv.weight.detach().to(torch.float64)

    def structural_zeros(self) -> dict[str, torch.Tensor]:
        """All but the m largest-magnitude taps of every kernel slice (read from the weight, so a saved and
        reloaded model has the same mask; a kept tap that is exactly zero may swap with a zero one)."""
        w = self.conv.weight.detach()
        flat = w.reshape(w.shape[0], w.shape[1], -1)
        return {"conv.weight": ~kernel_tap_mask(flat.abs(), self.rank).reshape(w.shape)}


class SAL(FactorizationMethod):
    name = "sal"
    summary = "k_h x k_w -> the same conv keeping the m strongest taps of every kernel slice (the rest zero)"
    rank_meaning = ("m: taps kept per (output, input) kernel slice (SAL: 1, SAL2: 2); exact at k_h*k_w; the "
                    "zeros are unstructured pruning (p_u), no time saved on a dense runtime")
    module_cls = SALConv
    rank_components = ("m",)
    pruning = True

    def unsupported_reason(self, layer: nn.Module) -> str | None:
        return conv_reason(self.name, layer, pointwise="a 1x1 conv has one tap per kernel: nothing to keep or drop "
                                                       "(use svd)", allow_depthwise=True)

    def full_rank(self, layer: nn.Module) -> int:
        return LayerGeometry.of(layer).kernel_volume

    def spectra(self, layer: nn.Module) -> list[np.ndarray]:
        """sqrt of sum_(o, c) (the j-th largest W[o, c, t]^2), j = 1..T: decreasing, and its first m squares
        sum to the energy m taps per slice keep (so ``energy`` picks m exactly)."""
        w = layer.weight.detach().to(torch.float64)
        squares = w.reshape(w.shape[0], w.shape[1], -1) ** 2
        return [torch.sort(squares, dim=-1, descending=True).values.sum(dim=(0, 1)).sqrt().cpu().numpy()]

    def decompose(self, layer: nn.Module, rank: int) -> SALConv:
        return SALConv.empty(layer, rank).load_factors([sal_weight(layer.weight, rank)], layer)


register(SAL())
