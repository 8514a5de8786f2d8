"""Input patches of a layer and running second moments of them, in a bounded-size form.

A layer's patch is what one output position reads (C_in/g * k_h * k_w values, channel-major, as
``layer.weight[o].flatten()``); ``patch_extractor`` gets them by im2col after the layer's own padding,
or, given sampled rows, gathers only those (the statistics use a seeded subset of positions, so the
full patch matrix is never formed). ``Moments`` sums E[p_l p_r^T] in the full, Kronecker-factored
(channels x taps) or diagonal form (``convfactor.auto.statistics.covariance``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...geometry import LayerGeometry
from .covariance import Covariance, DiagonalCovariance, FullCovariance, KroneckerCovariance

__all__ = ["PatchRows", "patch_extractor", "Moments", "ProjectedMoments", "WeightCross", "chunks", "positions",
           "sampled", "sampled_rows", "gram", "CHUNK_BYTES"]

CHUNK_BYTES = 64 << 20  # patches extracted at once, at most about this much
# A symmetric second moment X^T X of at least this many columns is made in SYMMETRIC_BLOCKS column blocks,
# the upper block triangle only (5/8 of the products): 1.3-1.5x faster than one GEMM on 2 cores for
# 576-4608 columns (ResNet-18's and CRAFT's patch widths).
SYMMETRIC_MIN_COLUMNS = 256
SYMMETRIC_BLOCKS = 4


def patch_extractor(layer: nn.Module) -> PatchRows:
    """A function mapping the layer's input to its patches, (rows, C_in * K), channels-major per row.

    Column c*K + k holds input channel c at kernel offset k (row-major over the kernel), the order of
    ``layer.weight[o].flatten()`` when groups == 1; group q's patch is the q-th block of C_in/g * K
    columns. A Linear's "patch" is its input vector. Called as ``extract(x, rows)`` it gathers only the
    patches of the given rows (flat (sample, output position) indices, ``extract.positions(x)`` in all)
    instead of unfolding every position.
    """
    return PatchRows(layer)


class PatchRows:
    """im2col of one layer's input after its own padding ('same' and ``padding_mode`` included)."""

    def __init__(self, layer: nn.Module):
        geo = LayerGeometry.of(layer)
        self.linear = geo.kind == "Linear"
        self.dtype = layer.weight.dtype
        if self.linear:
            return
        # The layer's own padding (PyTorch keeps it as F.pad widths, 'same' included), then im2col.
        self.widths = tuple(layer._reversed_padding_repeated_twice)
        self.mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        self.one_d = geo.dims == 1
        self.kernel = (*layer.kernel_size, 1) if self.one_d else tuple(layer.kernel_size)
        self.dilation = (*layer.dilation, 1) if self.one_d else tuple(layer.dilation)
        self.stride = (*layer.stride, 1) if self.one_d else tuple(layer.stride)

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x.to(self.dtype), self.widths, mode=self.mode) if any(self.widths) else x.to(self.dtype)
        return x.unsqueeze(-1) if self.one_d else x

    def _out_size(self, sizes: Sequence[int]) -> tuple[int, int]:
        """Output positions along the two (1-D: one and a unit) axes of a padded input of ``sizes``."""
        return tuple((size - d * (k - 1) - 1) // s + 1 for size, k, d, s in
                     zip(sizes, self.kernel, self.dilation, self.stride))

    def positions(self, x: torch.Tensor) -> int:
        """Patch rows of ``x`` (samples times output positions)."""
        if self.linear:
            return x.numel() // x.shape[-1]
        sizes = list(x.shape[2:])
        for i in range(len(self.widths) // 2):  # F.pad widths: last axis first
            sizes[-1 - i] += self.widths[2 * i] + self.widths[2 * i + 1]
        out_h, out_w = self._out_size(sizes + [1] if self.one_d else sizes)
        return x.shape[0] * out_h * out_w

    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        if self.linear:
            flat = x.reshape(-1, x.shape[-1])
            return flat if rows is None else flat[rows]
        x = self._padded(x)
        if rows is None:
            out = F.unfold(x, self.kernel, dilation=self.dilation, stride=self.stride)  # (N, C_in*K, positions)
            return out.transpose(1, 2).reshape(-1, out.shape[1])
        # Gather the sampled rows only: row = (n, i, j) reads x[n, :, i*s + a*d, j*s + b*d] over taps (a, b).
        out_h, out_w = self._out_size(x.shape[-2:])
        n, rest = rows // (out_h * out_w), rows % (out_h * out_w)
        (kh, kw), (dh, dw), (sh, sw) = self.kernel, self.dilation, self.stride
        hi = (rest // out_w)[:, None] * sh + torch.arange(kh, device=x.device) * dh  # (rows, kh)
        wj = (rest % out_w)[:, None] * sw + torch.arange(kw, device=x.device) * dw  # (rows, kw)
        patches = x[n[:, None, None], :, hi[:, :, None], wj[:, None, :]]  # (rows, kh, kw, C)
        return patches.permute(0, 3, 1, 2).reshape(len(rows), -1)


def gram(x: torch.Tensor) -> torch.Tensor:
    """X^T X of x (..., rows, D), exactly symmetric. torch has no symmetric product (BLAS syrk): for wide x
    the upper block triangle is multiplied block by block and mirrored, 10 of the 16 blocks' products."""
    d = x.shape[-1]
    if d < SYMMETRIC_MIN_COLUMNS:
        return x.transpose(-2, -1) @ x
    edges = [round(i * d / SYMMETRIC_BLOCKS) for i in range(SYMMETRIC_BLOCKS + 1)]
    out = x.new_empty(*x.shape[:-2], d, d)
    for start, stop in zip(edges[:-1], edges[1:]):
        block = x[..., start:stop].transpose(-2, -1) @ x[..., start:]  # rows start:stop, columns start:
        out[..., start:stop, start:] = block
        out[..., start:, start:stop] = block.transpose(-2, -1)
        corner = block[..., :stop - start].triu()  # the diagonal block: its upper triangle, mirrored
        out[..., start:stop, start:stop] = corner + corner.triu(1).transpose(-2, -1)
    return out


class Moments:
    """Running sums of E[p_left p_right^T] in one covariance form, fed (g, rows, D) patch blocks."""

    def __init__(self, form: str, groups: int, channels: int, kernel: int, note: str = ""):
        self.form, self.groups, self.channels, self.kernel, self.note = form, groups, channels, kernel, note
        self.sums: list[torch.Tensor] | None = None
        self.rows = 0
        self.channel_sum: torch.Tensor | None = None  # Kronecker: sum of x_l x_r^T over input positions
        self.positions = 0

    def add(self, left: torch.Tensor, right: torch.Tensor) -> None:
        """Patches (g, rows, D); for the Kronecker form they give the kernel-tap factor only."""
        g, rows, _ = left.shape
        if self.form == "full":
            parts = [gram(left) if left is right else left.transpose(1, 2) @ right]
        elif self.form == "kronecker":
            x_l = left.reshape(g, rows, self.channels, self.kernel)
            x_r = right.reshape(g, rows, self.channels, self.kernel)
            parts = [torch.einsum("grck,grcl->gkl", x_l, x_r)]
        else:
            parts = [(left * right).sum(1)]
        parts = [t.to(torch.float64).cpu() for t in parts]
        self.sums = parts if self.sums is None else [s + t for s, t in zip(self.sums, parts)]
        self.rows += rows

    def add_channels(self, left: torch.Tensor, right: torch.Tensor) -> None:
        """Kronecker form: input vectors (g, positions, C) at the same positions of both inputs.

        The channel factor E[X X^T] = sum over taps of E[x x^T] at the tapped positions, i.e. K times
        the second moment of the input's channel vectors (edges aside): read off the input positions,
        which costs positions * C^2 instead of patches * C^2 * K.
        """
        part = (gram(left) if left is right else left.transpose(1, 2) @ right).to(torch.float64).cpu()
        self.channel_sum = part if self.channel_sum is None else self.channel_sum + part
        self.positions += left.shape[1]

    def result(self) -> Covariance:
        means = [s / self.rows for s in self.sums]
        if self.form == "full":
            return FullCovariance(means[0])
        if self.form == "kronecker":
            a, b = self.channel_sum * (self.kernel / self.positions), means[0]
            trace = a.diagonal(dim1=1, dim2=2).sum(-1)
            trace = torch.where(trace.abs() > 1e-300, trace, torch.ones_like(trace))
            return KroneckerCovariance(a, b / trace[:, None, None], self.note)
        return DiagonalCovariance(means[0], self.note)


def chunks(x: torch.Tensor, layer: nn.Module) -> list[torch.Tensor]:
    """``x`` split along the batch so that one chunk's patch matrix stays near CHUNK_BYTES."""
    geo = LayerGeometry.of(layer)
    if geo.kind == "Linear" or x.shape[0] <= 1:
        return [x]
    per_sample = x[0].numel() * geo.kernel_volume * x.element_size() / math.prod(geo.stride)
    size = max(1, int(CHUNK_BYTES // max(per_sample, 1)))
    return list(x.split(size)) if size < x.shape[0] else [x]


def positions(x: torch.Tensor, groups: int) -> torch.Tensor:
    """A conv input (N, C, *spatial) as (g, N * positions, C/g) channel vectors."""
    flat = x.flatten(2).transpose(1, 2).reshape(-1, x.shape[1])
    return flat.reshape(flat.shape[0], groups, -1).transpose(0, 1)


def sampled(p: torch.Tensor, keep: int, generator: torch.Generator) -> torch.Tensor | None:
    """A seeded random subset of ``keep`` rows of ``p`` (all when it has fewer)."""
    return sampled_rows(p.shape[0], keep, generator, p.device)


def sampled_rows(total: int, keep: int, generator: torch.Generator, device: Any = None) -> torch.Tensor | None:
    """A seeded random subset of ``keep`` of ``total`` row indices, sorted (None: all of them)."""
    if total <= keep:
        return None
    return torch.randperm(total, generator=generator)[:keep].sort().values.to(device)


class WeightCross:
    """W E[p_r p_w^T] (g, O, D) for one weight W: the only product of the cross moment E[p_w p_r^T] that the
    sequential refit reads (``corrected_weight``: W cross^T), without the D x D moment itself."""

    def __init__(self, weight: torch.Tensor, value: torch.Tensor):
        self.weight, self.value = weight, value

    def of(self, weight: torch.Tensor) -> torch.Tensor:
        """W cross^T for the W this was projected with (any other weight is an error, not a product)."""
        if weight.shape != self.weight.shape or not torch.allclose(weight.to(self.weight.dtype), self.weight):
            raise ValueError("WeightCross holds W E[p_r p_w^T] for one W; asked for another weight")
        return self.value


class ProjectedMoments:
    """Running sums of E[(W p_r) p_w^T] for a fixed W (g, O, D), fed (g, rows, D) patch blocks: 2 O D products
    per row instead of the full cross moment's D^2 (``projects`` says when that is fewer)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.sum: torch.Tensor | None = None
        self.rows = 0

    @staticmethod
    def projects(outputs: int, width: int) -> bool:
        """Whether projecting through O outputs is cheaper than the D x D moment of width D."""
        return 2 * outputs < width

    def add(self, work: torch.Tensor, reference: torch.Tensor) -> None:
        outputs = reference @ self.weight.transpose(1, 2)  # (g, rows, O): the original layer's outputs, no bias
        part = (outputs.transpose(1, 2) @ work).to(torch.float64).cpu()
        self.sum = part if self.sum is None else self.sum + part
        self.rows += work.shape[1]

    def result(self) -> WeightCross:
        return WeightCross(self.weight, self.sum / self.rows)
