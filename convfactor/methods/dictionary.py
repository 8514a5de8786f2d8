"""Kernel dictionary (the course's sparse dictionary learning): every k x k kernel of a layer is written in
K shared atoms, as a depthwise conv (multiplier K, the same atoms for every input channel) then a 1x1
conv holding the codes.

Math: the N = C_out * C_in/g kernels W[o, c] (vectors of T = k_h*k_w taps) are the rows of X (N, T);
X ~= U V with V (K, T) a dictionary of unit-norm atoms and U (N, K) a sparse code, fit by scikit-learn's
``MiniBatchDictionaryLearning`` (objective 0.5 ||X - U V||^2 + alpha ||U||_1 on X scaled to unit RMS, so
``alpha`` is relative; atoms initialized from the top right singular vectors of X; codes by coordinate-descent lasso).
With alpha = 0 the code is the least-squares one. Then y[o] = sum_c sum_j U[(o, c), j] (V_j * x_c): the
depthwise stage convolves every input channel with the K atoms (the layer's own stride, padding,
dilation and padding_mode), the 1x1 stage (groups of the original) weights them with the code.
At K = T the dictionary is the identity and the code is X itself: exact, and no sparsity.

The code's zeros (``alpha`` > 0) are unstructured sparsity: they count in the challenge score (p_u), not
in a dense runtime's time, and ``convfactor.auto.finetune`` keeps them zero (``DictionaryConv.structural_zeros``).
The depthwise weight stores the atoms once per input channel (C_in*K*T values for K*T distinct ones);
parameter counts include those copies.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from ..geometry import LayerGeometry
from .base import FactorizationMethod, conv_reason, register
from .depthwise import DepthwisePointwiseConv

__all__ = ["DEFAULT_ALPHA", "dictionary_factors", "DictionaryConv", "Dictionary"]

# Relative l1 weight of the code (on kernels scaled to unit RMS); the zeros it gives are measured by
# benchmarks/course_methods.py (variant dictionary:4:nodata).
DEFAULT_ALPHA = 0.1
_MAX_ROWS_FIT = 20000  # kernels the atoms are learned from (a seeded subset); every kernel is then coded


def _kernels(weight: torch.Tensor) -> np.ndarray:
    """(C_out, C_in/g, *k) -> X (C_out * C_in/g, T) float64, row (o, c)."""
    w = weight.detach().to(torch.float64)
    return w.reshape(w.shape[0] * w.shape[1], -1).cpu().numpy()


def learn_dictionary(x: np.ndarray, atoms: int, alpha: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(code U (N, K), dictionary V (K, T)) with X ~= U V; exact identity construction at K = T."""
    n, taps = x.shape
    if atoms == taps:
        return x.copy(), np.eye(taps)
    scale = float(np.sqrt(np.mean(x**2))) or 1.0
    xs = x / scale
    _, _, vh = np.linalg.svd(xs, full_matrices=False)
    init = vh[:atoms]
    if alpha > 0:
        from sklearn.decomposition import MiniBatchDictionaryLearning, sparse_encode

        rows = np.random.default_rng(seed).permutation(n)[:_MAX_ROWS_FIT] if n > _MAX_ROWS_FIT else slice(None)
        learner = MiniBatchDictionaryLearning(n_components=atoms, alpha=alpha, dict_init=init, batch_size=256,
                                              max_iter=5, fit_algorithm="cd", random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter of the inner lasso
            dictionary = learner.fit(xs[rows]).components_
            code = sparse_encode(xs, dictionary, algorithm="lasso_cd", alpha=alpha)
    else:
        dictionary = init  # orthonormal rows: the least-squares code is the projection
        code = xs @ dictionary.T
    return code * scale, dictionary


def dictionary_factors(weight: torch.Tensor, atoms: int, groups: int = 1,
                       alpha: float = DEFAULT_ALPHA) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise atom filters and 1x1 code weights with ``atoms`` shared atoms.

    Args:
        weight: (C_out, C_in/g, *k) conv weight.
        atoms: K, 1 <= K <= T (the kernel volume).
        groups: the conv's ``groups``.
        alpha: relative l1 weight of the code (0: least squares).
    Returns:
        depthwise (C_in * K, 1, *k) (channel c*K + j is atom j), code (C_out, C_in/g * K, 1[, 1]), float64.
    """
    c_out, c_in_g = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    code, dictionary = learn_dictionary(_kernels(weight), atoms, alpha)
    atoms_t = torch.from_numpy(np.ascontiguousarray(dictionary)).to(torch.float64)
    depthwise = atoms_t.reshape(1, atoms, *kernel).expand(c_in_g * groups, -1, *kernel)
    code_t = torch.from_numpy(np.ascontiguousarray(code)).to(torch.float64)
    return depthwise.reshape(-1, 1, *kernel), code_t.reshape(c_out, c_in_g * atoms, *((1,) * len(kernel)))


class DictionaryConv(DepthwisePointwiseConv):
    """``atoms`` (depthwise, original geometry, C_in -> C_in*K) then ``codes`` (1x1, C_in*K -> C_out, groups
    of the original, with the bias): the depthwise method's module with the atoms shared by every channel."""

    method_name = "dictionary"
    stage_names = ("atoms", "codes")

    def structural_zeros(self) -> dict[str, torch.Tensor]:
        """The code's exact zeros (the lasso's, ``alpha`` > 0; a data-aware refit code is dense: none)."""
        return {"codes.weight": self.codes.weight.detach() == 0}


class Dictionary(FactorizationMethod):
    """``alpha`` (instance attribute, default ``DEFAULT_ALPHA``): relative l1 weight of the code."""

    name = "dictionary"
    summary = "k_h x k_w -> depthwise with K shared atoms (multiplier K), 1x1 (C_in*K->C_out) holding sparse codes"
    rank_meaning = ("K: atoms of the dictionary every kernel is written in (the depthwise multiplier); exact at "
                    "k_h*k_w (identity atoms); code sparsity: get_method('dictionary').alpha")
    module_cls = DictionaryConv
    rank_components = ("K",)

    def __init__(self, alpha: float = DEFAULT_ALPHA):
        self.alpha = alpha

    def unsupported_reason(self, layer: nn.Module) -> str | None:
        return conv_reason(self.name, layer,
                           pointwise="a 1x1 conv: its kernels are scalars, a dictionary of them is a scale (use svd)")

    def full_rank(self, layer: nn.Module) -> int:
        return LayerGeometry.of(layer).kernel_volume

    def spectra(self, layer: nn.Module) -> list[np.ndarray]:
        """Singular values of the kernels X (N, T): ``energy`` as kept by a least-squares dictionary."""
        return [np.linalg.svd(_kernels(layer.weight), compute_uv=False)]

    def decompose(self, layer: nn.Module, rank: int) -> DictionaryConv:
        return DictionaryConv.empty(layer, rank).load_factors(
            dictionary_factors(layer.weight, rank, layer.groups, self.alpha), layer)


register(Dictionary())
