"""Data-aware fits of the methods whose structure is fixed by a choice, not by an SVD: shift (which kernel
taps each input channel keeps), sal (which taps each kernel slice keeps) and dictionary (which atoms every
kernel is written in).

Each replaces W (g, O, D) by X B^T with a fixed basis B of the patch space: for shift, B selects the kept
(channel, tap) entries; for sal, a selection per output channel; for dictionary,
B[(c, t), (c', j)] = delta(c, c') V[j, t] with V the atoms (learned from the weight). Given B, the output
error E||(W - X B^T) p||^2 over the calibration patches p is least squares in X:
X = W Sigma B (B^T Sigma B)^{-1}. Taps are chosen by the output energy they carry on the data,
W[o, c, t]^2 * E[p_(c,t)^2]. Exact at full rank (B square, invertible).

Memory: B is never formed. W Sigma comes from the covariance's own (bounded) operator; a selection's Gram
matrix B^T Sigma B is the rows and columns of Sigma it selects, read from the statistic (full, Kronecker or
diagonal); the dictionary's is A (x) V B V^T for a Kronecker statistic and per channel for a diagonal one.
So a fit needs O(O * D) plus its (q x q) Gram matrices, whatever the layer's shape.
"""

from __future__ import annotations

import torch

from ...methods import get_method
from ...methods.base import FactorizedLayer
from ...methods.dictionary import learn_dictionary
from ...methods.sal import SALConv, kernel_tap_mask
from ...methods.shift import ShiftConv, shift_pairs, top_taps
from ...progress import open_bar
from ..statistics.covariance import Covariance, DiagonalCovariance, FullCovariance, KroneckerCovariance
from .data_aware import LayerFactorizer

__all__ = ["TAP_FACTORIZERS", "selection_gram", "selection_refit", "dictionary_refit"]

# Output channels whose (q x q) Gram matrices are solved at once by the per-output selection refit (sal).
_GRAM_BYTES = 64 * 2**20
# O * q^3 above which a per-output selection refit shows its own bar (channels solved, ETA): about 5 s on one
# core (a 512 -> 512 3x3 sal layer at m = 2 is 5.5e11, 25-35 CPU-s here).
_LONG_REFIT = 1e11


def selection_gram(sigma: Covariance, rows: torch.Tensor) -> torch.Tensor:
    """Sigma[rows][:, rows] per group: rows (g, ..., q) indices into D -> (g, ..., q, q), read from the
    statistic (a Kronecker or diagonal form never becomes D x D)."""
    g = rows.shape[0]
    index = rows.reshape(g, -1, rows.shape[-1])  # (g, n, q)
    gathered = []
    for group in range(g):
        r = index[group]
        if isinstance(sigma, FullCovariance):
            block = sigma.sigma[group][r[:, :, None], r[:, None, :]]
        elif isinstance(sigma, KroneckerCovariance):
            k = sigma.b.shape[-1]
            c, t = r // k, r % k
            if bool((c == c[:1]).all()):  # the same channels in every selection (sal: m taps of each): once
                a = sigma.a[group][c[0][:, None], c[0][None, :]][None]
            else:
                a = sigma.a[group][c[:, :, None], c[:, None, :]]
            # B[t_i, t_j] as products with one-hot rows (exact: one nonzero term each), 4x faster than a gather
            taps = torch.nn.functional.one_hot(t, k).to(sigma.b.dtype)
            block = torch.bmm(taps @ sigma.b[group], taps.mT).mul_(a)
        elif isinstance(sigma, DiagonalCovariance):
            block = torch.diag_embed(sigma.v[group][r])
        else:
            raise TypeError(f"no selection Gram matrix for a {type(sigma).__name__}")
        gathered.append(block)
    stacked = gathered[0][None] if g == 1 else torch.stack(gathered)  # one group: no copy
    return stacked.reshape(*rows.shape, rows.shape[-1])


def selection_refit(weight: torch.Tensor, sigma: Covariance, rows: torch.Tensor,
                    progress: bool | str = False) -> torch.Tensor:
    """Least-squares values on a selection of the patch entries: X[o] = (W Sigma)[o, S_o] Sigma[S_o, S_o]^-1.

    Args:
        weight: W (g, O, D). sigma: the (damped) covariance.
        rows: (g, q) one selection for every output channel, or (g, O, q) one per output channel.
        progress: a bar of the output channels solved (with an ETA) when the per-output solves are long.
    Returns:
        X (g, O, q), the values at the selected entries.
    """
    w_sigma = sigma.right(weight)  # (g, O, D)
    if rows.dim() == 2:
        gram = selection_gram(sigma, rows)  # (g, q, q)
        rhs = torch.gather(w_sigma, 2, rows[:, None, :].expand(-1, weight.shape[1], -1))
        return torch.linalg.solve(gram, rhs.transpose(1, 2)).transpose(1, 2)
    g, o, q = rows.shape
    out = torch.empty(g, o, q, dtype=torch.float64)
    chunk = max(1, _GRAM_BYTES // (8 * q * q))
    bar = open_bar(progress if g * o * q**3 >= _LONG_REFIT else False, "sal refit", total=o, unit="channel")
    try:
        for start in range(0, o, chunk):
            part = rows[:, start:start + chunk]  # (g, n, q)
            rhs = torch.gather(w_sigma[:, start:start + chunk], 2, part)  # (g, n, q)
            out[:, start:start + chunk] = torch.linalg.solve(selection_gram(sigma, part), rhs[..., None])[..., 0]
            bar.update(part.shape[1])
    finally:
        bar.close()
    return out


def dictionary_refit(weight: torch.Tensor, sigma: Covariance, atoms: torch.Tensor) -> torch.Tensor:
    """The code X (g, O, C*K) minimizing the output error of X B^T, B = I_C (x) V^T, V = ``atoms`` (K, T).

    W Sigma B is (W Sigma) with every channel's T taps projected on the atoms; B^T Sigma B is
    (CK x CK) for a full statistic, A (x) V B_t V^T for a Kronecker one (solved factor by factor), and C
    blocks V diag(v_c) V^T for a diagonal one.
    """
    g, o, d = weight.shape
    k, t = atoms.shape
    c = d // t
    rhs = (sigma.right(weight).reshape(g, o, c, t) @ atoms.T)  # (g, O, C, K)
    if isinstance(sigma, FullCovariance):
        blocks = sigma.sigma.reshape(g, c, t, c, t)
        gram = torch.einsum("gatbu,jt,ku->gajbk", blocks, atoms, atoms).reshape(g, c * k, c * k)
        return torch.linalg.solve(gram, rhs.reshape(g, o, c * k).transpose(1, 2)).transpose(1, 2)
    if isinstance(sigma, KroneckerCovariance):
        taps = atoms @ sigma.b @ atoms.T  # (g, K, K)
        x = torch.linalg.solve(taps[:, None], rhs.transpose(-1, -2)).transpose(-1, -2)  # atoms side
        x = torch.linalg.solve(sigma.a, x.transpose(1, 2).reshape(g, c, o * k))  # channel side
        return x.reshape(g, c, o, k).transpose(1, 2).reshape(g, o, c * k)
    if isinstance(sigma, DiagonalCovariance):
        v = sigma.v.reshape(g, c, t)
        gram = torch.einsum("jt,gct,kt->gcjk", atoms, v, atoms)  # (g, C, K, K)
        x = torch.linalg.solve(gram[:, None], rhs[..., None])[..., 0]  # (g, O, C, K)
        return x.reshape(g, o, c * k)
    raise TypeError(f"no dictionary refit for a {type(sigma).__name__}")


def _tap_energy(factorizer: LayerFactorizer) -> torch.Tensor:
    """W[o, c, t]^2 * E[p_(c,t)^2]: (g, O, C, T) output energy of every weight entry on the data."""
    g, o, d = factorizer.weight.shape
    c = factorizer.geometry.in_channels // factorizer.geometry.groups
    variance = factorizer.sigma.diagonal().reshape(g, 1, c, d // c)
    return factorizer.weight.reshape(g, o, c, d // c).pow(2) * variance


class _ShiftFactorizer(LayerFactorizer):
    method_name = "shift"

    def factors(self, rank: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        taps = top_taps(_tap_energy(self)[0].sum(dim=0), rank)
        _, o, d = self.weight.shape
        kernel_volume = d // self.geometry.in_channels
        rows = torch.tensor([[c * kernel_volume + t for c, t in shift_pairs(taps)]])
        mixing = selection_refit(self.weight, self.sigma_damped, rows)  # (1, O, m*C)
        dense = torch.zeros_like(self.weight).scatter_(2, rows[:, None, :].expand(-1, o, -1), mixing)
        return (taps, mixing[0]), dense

    def module(self, rank: int) -> FactorizedLayer:
        (taps, mixing), _ = self.factors(rank)
        return ShiftConv.empty(self.layer, rank, taps).load_factors([mixing], self.layer)


class _SALFactorizer(LayerFactorizer):
    """Per output channel, the m taps of every kernel slice carrying the most output energy on the data,
    their values refit jointly by least squares (one (m*C x m*C) solve per output channel)."""

    method_name = "sal"

    def factors(self, rank: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        g, o, d = self.weight.shape
        mask = kernel_tap_mask(_tap_energy(self), rank).reshape(g, o, d)
        rows = torch.nonzero(mask)[:, 2].reshape(g, o, -1)  # (g, O, m*C) in increasing order
        values = selection_refit(self.weight, self.sigma_damped, rows, self.progress)
        dense = torch.zeros_like(self.weight).scatter_(2, rows, values)
        return (dense.reshape(self.layer.weight.shape),), dense

    def module(self, rank: int) -> FactorizedLayer:
        (weight,), _ = self.factors(rank)
        return SALConv.empty(self.layer, rank).load_factors([weight], self.layer)


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
        code = dictionary_refit(self.weight, self.sigma_damped, atoms_t)  # (g, O, C*K)
        kernel = self.geometry.kernel
        depthwise = atoms_t.reshape(1, rank, *kernel).expand(g * channels, -1, *kernel).reshape(-1, 1, *kernel)
        stages = (depthwise, code.reshape(g * o, channels * rank, *((1,) * len(kernel))))
        dense = (code.reshape(g, o, channels, rank) @ atoms_t).reshape(g, o, d)
        return stages, dense


TAP_FACTORIZERS: dict[str, type[LayerFactorizer]] = {
    "shift": _ShiftFactorizer, "sal": _SALFactorizer, "dictionary": _DictionaryFactorizer}
