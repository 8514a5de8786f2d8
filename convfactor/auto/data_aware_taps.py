"""Data-aware fits of the methods whose first stage is fixed by a choice, not by an SVD: shift (which kernel
taps each input channel keeps) and dictionary (which atoms every kernel is written in).

Both replace W (g, O, D) by X B^T with a fixed basis B (D, q) of the patch space: for shift, B selects
the kept (channel, tap) entries; for dictionary, B[(c, t), (c', j)] = delta(c, c') V[j, t] with V the
atoms (learned from the weight). Given B, the output error E||(W - X B^T) p||^2 over the calibration
patches p is least squares in X (``least_squares_refit``): the 1x1 stage is refit to the data.
Shift's taps are chosen by the output energy they carry on the data, sum_o W[o, c, t]^2 * E[p_(c,t)^2].
Exact at full rank (B square, invertible).
"""

from __future__ import annotations

import torch

from ..methods import get_method
from ..methods._stages import set_weight
from ..methods.base import FactorizedLayer
from ..methods.dictionary import learn_dictionary
from ..methods.shift import ShiftConv, shift_pairs, top_taps
from .data_aware import LayerFactorizer, least_squares_refit

__all__ = ["EXTRA_FACTORIZERS"]


class _ShiftFactorizer(LayerFactorizer):
    method_name = "shift"

    def _taps(self, rank: int) -> list[list[int]]:
        _, o, d = self.weight.shape
        c = self.geometry.in_channels
        variance = self.sigma.diagonal()[0].reshape(c, d // c)
        return top_taps(self.weight[0].reshape(o, c, d // c).pow(2).sum(dim=0) * variance, rank)

    def factors(self, rank: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        taps = self._taps(rank)
        _, o, d = self.weight.shape
        kernel_volume = d // self.geometry.in_channels
        rows = [c * kernel_volume + t for c, t in shift_pairs(taps)]
        basis = torch.zeros(1, d, len(rows), dtype=torch.float64)
        basis[0, rows, range(len(rows))] = 1.0
        mixing = least_squares_refit(self.weight, self.sigma_damped, basis)  # (1, O, m*C)
        return (taps, mixing[0]), mixing @ basis.transpose(1, 2)

    def module(self, rank: int) -> FactorizedLayer:
        (taps, mixing), _ = self.factors(rank)
        module = ShiftConv.empty(self.layer, rank, taps)
        set_weight(module.pointwise, mixing, None if self.layer.bias is None else self.layer.bias.detach())
        return module


class _DictionaryFactorizer(LayerFactorizer):
    """Atoms learned from the (possibly corrected) weight; the code refit by least squares on the data.

    The refit code is dense: the zeros an ``alpha`` > 0 gave are not kept (a support-preserving refit
    is one solve per output channel).
    """

    method_name = "dictionary"

    def factors(self, rank: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        g, o, d = self.weight.shape
        channels = self.geometry.in_channels // g
        taps = d // channels
        _, atoms = learn_dictionary(self.weight.reshape(-1, taps).cpu().numpy(), rank,
                                    get_method("dictionary").alpha)
        atoms_t = torch.from_numpy(atoms).to(torch.float64)  # (K, T)
        eye = torch.eye(channels, dtype=torch.float64)
        # B[(c, t), (c', j)] = delta(c, c') V[j, t]: input channel c convolved with atom j.
        basis = torch.einsum("ab,jt->atbj", eye, atoms_t).reshape(1, d, channels * rank).expand(g, -1, -1)
        code = least_squares_refit(self.weight, self.sigma_damped, basis)  # (g, O, C*K)
        kernel = self.geometry.kernel
        depthwise = atoms_t.reshape(1, rank, *kernel).expand(g * channels, -1, *kernel).reshape(-1, 1, *kernel)
        stages = (depthwise, code.reshape(g * o, channels * rank, *((1,) * len(kernel))))
        return stages, code @ basis.transpose(1, 2)


EXTRA_FACTORIZERS: dict[str, type[LayerFactorizer]] = {"shift": _ShiftFactorizer, "dictionary": _DictionaryFactorizer}
