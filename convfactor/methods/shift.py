"""Shift + pointwise (the shift layer of Wu et al. 2018; post-training form of the course's shift attention
layer, Hacene et al.): a k x k conv becomes "shift each input channel by m of its kernel offsets" (no
MACs) followed by a 1x1 conv (m*C_in -> C_out).

Math: the conv is y[o] = sum_{c, t} W[o, c, t] * x_pad[c] read at offset t (t over the k_h*k_w taps,
offset (i*d_h, j*d_w), every s-th pixel). Keeping, per input channel c, the m taps T_c with the most
kernel energy sum_o W[o, c, t]^2 leaves y[o] ~= sum_c sum_{t in T_c} W[o, c, t] * shift_t(x)[c]: the
shift stage produces the m*C_in shifted channels, and the 1x1 conv holds W at the kept taps (refit by
least squares on calibration inputs, see ``convfactor.auto.fits.taps``). Exact at m = k_h*k_w:
every tap is kept and the sum is the convolution.

The shift stage is data movement only: one Pad of the input (the layer's own padding and padding_mode),
then per kernel offset one strided Slice (and a Gather of the channels that use it), concatenated. It
exports to ONNX as Pad + Slice + Gather + Concat, not as a one-hot depthwise conv. Its channels are
ordered by offset, then by input channel; ``ChannelShift.pairs`` says which (channel, tap) each is.
Grouped convs are not handled (the pointwise stage would need its channels grouped).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import LayerGeometry
from ._stages import pointwise
from .base import FactorizationMethod, FactorizedLayer, conv_reason, register

__all__ = ["tap_energy", "top_taps", "shift_pairs", "shift_factors", "ChannelShift", "ShiftConv", "Shift"]


def tap_energy(weight: torch.Tensor) -> torch.Tensor:
    """sum_o W[o, c, t]^2: (C_in, T) float64, T = kernel volume (taps in row-major kernel order)."""
    w = weight.detach().to(torch.float64)
    return w.reshape(w.shape[0], w.shape[1], -1).pow(2).sum(dim=0)


def top_taps(score: torch.Tensor, m: int) -> list[list[int]]:
    """Per channel, the ``m`` taps with the highest ``score`` (C_in, T), in increasing tap order."""
    order = torch.argsort(-score, dim=1, stable=True)[:, :m]
    return [sorted(row) for row in order.tolist()]


def shift_pairs(taps: list[list[int]]) -> list[tuple[int, int]]:
    """The (channel, tap) of each shifted channel, in the shift stage's order: by tap, then by channel."""
    return sorted(((c, t) for c, row in enumerate(taps) for t in row), key=lambda pair: (pair[1], pair[0]))


def shift_factors(weight: torch.Tensor, taps: list[list[int]]) -> torch.Tensor:
    """The 1x1 weight (C_out, m*C_in[, 1, 1]) reading W at ``taps`` in the shift stage's order, float64."""
    w = weight.detach().to(torch.float64)
    flat = w.reshape(w.shape[0], w.shape[1], -1)
    pairs = shift_pairs(taps)
    columns = flat[:, [c for c, _ in pairs], [t for _, t in pairs]]  # (C_out, m*C_in)
    return columns.reshape(w.shape[0], len(pairs), *((1,) * (w.dim() - 2)))


def _explicit_padding(geo: LayerGeometry) -> list[int]:
    """F.pad's argument (last axis first) for the layer's padding, 'same' split as PyTorch splits it."""
    pads: list[int] = []
    for axis in reversed(range(geo.dims)):
        if geo.padding == "same":
            total = geo.dilation[axis] * (geo.kernel[axis] - 1)
            pads += [total // 2, total - total // 2]
        else:
            pads += [geo.padding[axis]] * 2
    return pads


class ChannelShift(nn.Module):
    """Pads the input like the original conv, then gathers each channel at its kept kernel offsets.

    Args:
        geometry: the original layer's geometry (kernel, stride, padding, dilation, padding_mode).
        taps: per input channel, the kept taps (indices into the row-major kernel), m per channel.
        device: where the index buffers live.
    The ``taps`` buffer (C_in, m) is in the state dict; loading it rebuilds the gather indices.
    """

    def __init__(self, geometry: LayerGeometry, taps: list[list[int]], device: torch.device | None = None):
        super().__init__()
        self.geometry = geometry
        self.pads = _explicit_padding(geometry)
        self.mode = "constant" if geometry.padding_mode == "zeros" else geometry.padding_mode
        self.register_buffer("taps", torch.tensor(taps, dtype=torch.long, device=device))
        self._plan(taps)

    def _plan(self, taps: list[list[int]]) -> None:
        channels = len(taps)
        self.pairs = shift_pairs(taps)
        self.offsets: list[tuple[int, str | None]] = []  # per tap used: (tap, name of its index buffer or None)
        for name in [n for n, _ in self.named_buffers(recurse=False) if n.startswith("index_")]:
            delattr(self, name)
        device = self.taps.device
        for tap in sorted({t for _, t in self.pairs}):
            users = [c for c, t in self.pairs if t == tap]
            if users == list(range(channels)):
                self.offsets.append((tap, None))
                continue
            name = f"index_{tap}"
            self.register_buffer(name, torch.tensor(users, dtype=torch.long, device=device), persistent=False)
            self.offsets.append((tap, name))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._plan(self.taps.tolist())

    def _window(self, tap: int) -> tuple[slice, ...]:
        """The strided slice of the padded input that kernel tap ``tap`` reads, one per spatial axis."""
        geo = self.geometry
        position = []
        for k in reversed(geo.kernel):
            position.append(tap % k)
            tap //= k
        window = []
        for axis, i in enumerate(reversed(position)):
            d, k = geo.dilation[axis], geo.kernel[axis]
            end = -d * (k - 1 - i)
            window.append(slice(i * d, end if end != 0 else None, geo.stride[axis]))
        return tuple(window)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pads):
            x = F.pad(x, self.pads, mode=self.mode)
        pieces = []
        for tap, index in self.offsets:
            piece = x[(slice(None), slice(None), *self._window(tap))]
            if index is not None:
                piece = piece.index_select(1, getattr(self, index))
            pieces.append(piece)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def extra_repr(self) -> str:
        return f"channels={len(self.taps)}, taps per channel={self.taps.shape[1]}"


def _default_taps(geo: LayerGeometry, m: int) -> list[list[int]]:
    """m taps per channel closest to the kernel centre (the structure ``build`` gives before loading)."""
    centre = [(k - 1) / 2 for k in geo.kernel]
    taps = list(range(geo.kernel_volume))

    def distance(tap: int) -> float:
        position = []
        for k in reversed(geo.kernel):
            position.append(tap % k)
            tap //= k
        return math.dist(list(reversed(position)), centre)

    kept = sorted(sorted(taps, key=distance)[:m])
    return [list(kept) for _ in range(geo.in_channels)]


class ShiftConv(FactorizedLayer):
    """``shift`` (C_in -> m*C_in shifted channels, no weights) then ``pointwise`` (1x1, m*C_in -> C_out, bias)."""

    method_name = "shift"

    @classmethod
    def empty(cls, layer: nn.Module, rank: int, taps: list[list[int]] | None = None) -> ShiftConv:
        geo = LayerGeometry.of(layer)
        taps = _default_taps(geo, rank) if taps is None else taps
        shift = ChannelShift(geo, taps, device=layer.weight.device)
        mix = pointwise(geo, geo.in_channels * rank, geo.out_channels, bias=geo.bias, like=layer)
        return cls(OrderedDict(shift=shift, pointwise=mix), rank, geo)

    def dense_weight(self) -> torch.Tensor:
        geo = self.geometry
        p = self.pointwise.weight.detach().to(torch.float64).reshape(geo.out_channels, -1)
        w = torch.zeros(geo.out_channels, geo.in_channels, geo.kernel_volume, dtype=torch.float64,
                        device=p.device)
        pairs = self.shift.pairs
        w[:, [c for c, _ in pairs], [t for _, t in pairs]] = p
        return w.reshape(geo.out_channels, geo.in_channels, *geo.kernel)


class Shift(FactorizationMethod):
    name = "shift"
    summary = "k_h x k_w -> shift each input channel by its m strongest taps (no MACs), 1x1 (m*C_in->C_out)"
    rank_meaning = "m: kernel taps (shift offsets) kept per input channel; exact at k_h*k_w"
    module_cls = ShiftConv
    rank_components = ("m",)

    def unsupported_reason(self, layer: nn.Module) -> str | None:
        return conv_reason(self.name, layer, pointwise="a 1x1 conv has nothing to shift (use svd)",
                           grouped="shift handles ungrouped convs only (groups={groups})")

    def full_rank(self, layer: nn.Module) -> int:
        return LayerGeometry.of(layer).kernel_volume

    def spectra(self, layer: nn.Module) -> list[np.ndarray]:
        """sqrt of sum_c (the m-th largest tap energy of channel c), m = 1..T: decreasing, and its first m
        squares sum to the kernel energy m taps per channel keep (so ``energy`` picks m exactly)."""
        sorted_energy = torch.sort(tap_energy(layer.weight), dim=1, descending=True).values
        return [sorted_energy.sum(dim=0).sqrt().cpu().numpy()]

    def decompose(self, layer: nn.Module, rank: int, taps: list[list[int]] | None = None) -> ShiftConv:
        taps = top_taps(tap_energy(layer.weight), rank) if taps is None else taps
        return ShiftConv.empty(layer, rank, taps).load_factors([shift_factors(layer.weight, taps)], layer)


register(Shift())
