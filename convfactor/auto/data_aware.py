"""Data-aware factorization: minimize the error of a layer's OUTPUT on real inputs, not of its weight.

With p the input patch of one output position (C_in/g * k_h * k_w values, the layer's receptive field)
and Sigma = E[p p^T] over calibration data, the output error of a replacement W_hat is
E||(W - W_hat) p||^2 = tr((W - W_hat) Sigma (W - W_hat)^T) = ||(W - W_hat) L||_F^2 with Sigma = L L^T.

  * svd (1x1 / Linear): W_hat = (U_r S_r V_r^T) L^{-1} from the SVD of W L: optimal in that norm.
  * spatial_svd: whiten the (C_in*k_h) row space of the (C_in*k_h, C_out*k_w) reshape by the covariance
    of vertical input patches, truncate, then refit the horizontal stage by least squares against the
    full patch covariance (given the vertical filters, the output is linear in the horizontal ones).
  * tucker2: whiten the input-channel projection (HOSVD of W x_1 L^T), take the output projection
    from the top eigenvectors of the output covariance W Sigma W^T, then refit the core by least squares.

Sigma is damped by ``damping * mean(diag(Sigma))`` before whitening so that directions the calibration
data never excites stay well-posed (and weight-like). Every factorization is exact at full rank.
Sequential mode (``corrected_weight``) first moves W to the weight that best maps the inputs the layer
gets after earlier layers were factorized to its original outputs, so errors do not accumulate.
Weights are computed in float64 and stored in the module's dtype.
"""

from __future__ import annotations

import abc

import torch
from torch import nn

from ..geometry import LayerGeometry
from ..methods import get_method
from ..methods._stages import set_weight
from ..methods.base import FactorizedLayer, Rank

__all__ = [
    "DATA_AWARE_METHODS",
    "DEFAULT_DAMPING",
    "damped",
    "output_error2",
    "least_squares_refit",
    "whitened_svd_factors",
    "LayerFactorizer",
    "layer_factorizer",
    "corrected_weight",
    "grouped_weight",
]

DATA_AWARE_METHODS = ("svd", "spatial_svd", "tucker2", "channel_svd", "shift", "dictionary")
# Ridge added to Sigma, relative to its mean diagonal (as in GPTQ's 1% dampening): keeps the whitening
# well conditioned and lets low-variance directions fall back towards plain weight fitting.
DEFAULT_DAMPING = 1e-2


def damped(sigma: torch.Tensor, damping: float) -> torch.Tensor:
    """Sigma + damping * mean(diag(Sigma)) * I, per group; (g, D, D) float64 in and out."""
    eye = torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device)
    scale = sigma.diagonal(dim1=-2, dim2=-1).mean(dim=-1).clamp_min(1e-30)
    return sigma + damping * scale[:, None, None] * eye


def _cholesky(sigma: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of SPD (g, D, D) matrices, adding jitter when rounding made one indefinite."""
    factor, info = torch.linalg.cholesky_ex(sigma)
    jitter = 1e-12
    while bool((info > 0).any()):
        scale = sigma.diagonal(dim1=-2, dim2=-1).mean(dim=-1).clamp_min(1e-30)
        eye = torch.eye(sigma.shape[-1], dtype=sigma.dtype)
        factor, info = torch.linalg.cholesky_ex(sigma + jitter * scale[:, None, None] * eye)
        jitter *= 10
    return factor


def grouped_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(C_out, C_in/g, *k) or Linear (C_out, C_in) -> (g, C_out/g, C_in/g * K), float64, patch order."""
    w = weight.detach().to(torch.float64)
    return w.reshape(groups, w.shape[0] // groups, -1)


def output_error2(weight: torch.Tensor, approx: torch.Tensor, sigma: torch.Tensor) -> float:
    """E||(W - W_hat) p||^2 / E||W p||^2 for grouped weights (g, O, D) and patch covariance (g, D, D)."""
    delta = weight - approx
    error = torch.einsum("god,gde,goe->", delta, sigma, delta)
    signal = torch.einsum("god,gde,goe->", weight, sigma, weight)
    return float(error / signal) if float(signal) > 0 else float(error)


def least_squares_refit(target: torch.Tensor, sigma: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The X minimizing E||T p - X B^T p||^2 over p with E[p p^T] = Sigma: X = T Sigma B (B^T Sigma B)^{-1}.

    Args:
        target: T, (g, m, D). sigma: (g, D, D), SPD. basis: B, (g, D, q) with independent columns.
    Returns:
        X, (g, m, q).
    """
    sigma_b = sigma @ basis  # (g, D, q)
    gram = basis.transpose(1, 2) @ sigma_b  # (g, q, q), SPD
    rhs = (target @ sigma_b).transpose(1, 2)  # (g, q, m)
    return torch.linalg.solve(gram, rhs).transpose(1, 2)


def whitened_svd_factors(weight: torch.Tensor, sigma: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors of W minimizing tr((W - W_hat) Sigma (W - W_hat)^T), per group.

    Args:
        weight: (g, O, D). sigma: (g, D, D) SPD (already damped).
    Returns:
        first (g, r, D) and second (g, O, r) with W_hat = second @ first.
    """
    factor = _cholesky(sigma)  # L, (g, D, D)
    u, s, vh = torch.linalg.svd(weight @ factor, full_matrices=False)
    root = s[:, :rank].sqrt()
    left = vh[:, :rank, :] * root[:, :, None]  # (g, r, D): rows of sqrt(S) V^T
    # first = left L^{-1}, i.e. solve first L = left (L lower triangular).
    first = torch.linalg.solve_triangular(factor, left, upper=False, left=False)
    second = u[:, :, :rank] * root[:, None, :]
    return first, second


class LayerFactorizer(abc.ABC):
    """One layer's data-aware decomposition, set up once and truncated at any rank.

    Args:
        layer: the Conv/Linear layer (its weight and bias are read, never changed).
        sigma: (g, D, D) float64 covariance of its input patches (``LayerStatistics.covariance``).
        damping: ridge relative to the mean diagonal of sigma.
        weight: (g, O, D) weight to approximate instead of the layer's own (see ``corrected_weight``).
    """

    method_name: str = ""

    def __init__(self, layer: nn.Module, sigma: torch.Tensor, damping: float = DEFAULT_DAMPING,
                 weight: torch.Tensor | None = None):
        self.layer = layer
        self.geometry = LayerGeometry.of(layer)
        own = grouped_weight(layer.weight, self.geometry.groups)
        self.weight = own if weight is None else weight.to(torch.float64)  # (g, O, D)
        self.sigma = sigma.to(torch.float64)
        self.sigma_damped = damped(self.sigma, damping)

    @abc.abstractmethod
    def factors(self, rank: Rank) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """(stage weights in stage order as the method's module wants them, dense W_hat (g, O, D))."""

    def module(self, rank: Rank) -> FactorizedLayer:
        """The method's module at ``rank`` holding the data-aware weights (bias kept on the last stage)."""
        stages, _ = self.factors(rank)
        module = get_method(self.method_name).build(self.layer, rank)
        bias = None if self.layer.bias is None else self.layer.bias.detach()
        children = list(module.children())
        for index, (stage, weight) in enumerate(zip(children, stages)):
            set_weight(stage, weight, bias if index == len(children) - 1 else None)
        return module

    def error2(self, rank: Rank) -> float:
        """Relative squared output error of the rank-``rank`` factors on the calibration inputs."""
        return output_error2(self.weight, self.factors(rank)[1], self.sigma)


class _SVDFactorizer(LayerFactorizer):
    method_name = "svd"

    def factors(self, rank: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        first, second = whitened_svd_factors(self.weight, self.sigma_damped, rank)
        g, o, d = self.weight.shape
        return (first.reshape(g * rank, d), second.reshape(g * o, rank)), second @ first


class _ChannelSVDFactorizer(_SVDFactorizer):
    # The same whitened SVD of W as (C_out, D): channel_svd's first stage is the k x k conv.
    method_name = "channel_svd"


class _SpatialSVDFactorizer(LayerFactorizer):
    method_name = "spatial_svd"

    def __init__(self, layer: nn.Module, sigma: torch.Tensor, damping: float = DEFAULT_DAMPING,
                 weight: torch.Tensor | None = None):
        super().__init__(layer, sigma, damping, weight)
        geo = self.geometry
        self.k_h = geo.kernel[0]
        self.k_w = 1 if geo.dims == 1 else geo.kernel[1]
        g, o, _ = self.weight.shape
        c = geo.in_channels // g
        kh, kw = self.k_h, self.k_w
        # Vertical patches are the k_w column slices of the full patch: their covariance is the mean of
        # the diagonal (j, j) blocks of Sigma, indexed (c, i, j).
        blocks = self.sigma_damped.reshape(g, c, kh, kw, c, kh, kw)
        sigma_v = blocks.diagonal(dim1=3, dim2=6).mean(dim=-1).reshape(g, c * kh, c * kh)
        factor = _cholesky(sigma_v)  # L_v, (g, C*kh, C*kh)
        # (g, O, C, kh, kw) -> (g, C*kh, O*kw): the spatial-SVD reshape of each group.
        matrix = self.weight.reshape(g, o, c, kh, kw).permute(0, 2, 3, 1, 4).reshape(g, c * kh, o * kw)
        u, s, _ = torch.linalg.svd(factor.transpose(1, 2) @ matrix, full_matrices=False)
        # Vertical filters V = L_v^{-T} U sqrt(S), all ranks at once (truncation keeps leading columns).
        self.vertical_all = torch.linalg.solve_triangular(factor.transpose(1, 2), u * s.sqrt()[:, None, :],
                                                          upper=True)
        self.channels = c

    def factors(self, rank: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        g, o, d = self.weight.shape
        c, kh, kw = self.channels, self.k_h, self.k_w
        vertical = self.vertical_all[:, :, :rank]  # (g, C*kh, r)
        eye = torch.eye(kw, dtype=torch.float64)
        # B[(c, i, j'), (t, j)] = V[(c, i), t] * delta(j', j): the vertical outputs read at each column offset.
        basis = torch.einsum("gxt,ab->gxatb", vertical, eye).reshape(g, d, rank * kw)
        horizontal = least_squares_refit(self.weight, self.sigma_damped, basis)  # (g, O, r*kw)
        dense = horizontal @ basis.transpose(1, 2)
        # (g, C*kh, r) -> (g, r, C, kh) -> (g*r, C, kh[, 1])
        vertical_w = vertical.reshape(g, c, kh, rank).permute(0, 3, 1, 2).reshape(g * rank, c, kh)
        horizontal_w = horizontal.reshape(g * o, rank, kw)  # (C_out, r, kw)
        if self.geometry.dims == 2:
            vertical_w, horizontal_w = vertical_w.unsqueeze(-1), horizontal_w.unsqueeze(-2)
        return (vertical_w, horizontal_w), dense


class _Tucker2Factorizer(LayerFactorizer):
    method_name = "tucker2"

    def __init__(self, layer: nn.Module, sigma: torch.Tensor, damping: float = DEFAULT_DAMPING,
                 weight: torch.Tensor | None = None):
        super().__init__(layer, sigma, damping, weight)
        g, o, d = self.weight.shape
        i = self.geometry.in_channels // g
        k = d // i
        self.kernel_volume = k
        # Input-channel covariance: mean over kernel offsets of the diagonal (k, k) blocks of Sigma.
        sigma_c = self.sigma_damped.reshape(g, i, k, i, k).diagonal(dim1=2, dim2=4).mean(dim=-1)
        factor = _cholesky(sigma_c)  # L, (g, I, I)
        whitened = torch.einsum("goik,gij->gjok", self.weight.reshape(g, o, i, k), factor)  # (g, I, O, K)
        mode1 = whitened.reshape(g, i, o * k)
        _, u_in = torch.linalg.eigh(mode1 @ mode1.transpose(1, 2))  # ascending eigenvalues
        self.u_in = u_in.flip(-1)  # (g, I, I), leading first
        self.factor = factor
        # Output projection: principal directions of the layer's output on the data.
        _, u_out = torch.linalg.eigh(self.weight @ self.sigma_damped @ self.weight.transpose(1, 2))
        self.u_out = u_out.flip(-1)  # (g, O, O)

    def factors(self, rank: tuple[int, int]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        r_in, r_out = rank
        g, o, d = self.weight.shape
        k = self.kernel_volume
        i = d // k
        # project_in P = U_in~^T L^{-1}: solve P L = U_in~^T.
        project_in = torch.linalg.solve_triangular(self.factor, self.u_in[:, :, :r_in].transpose(1, 2),
                                                   upper=False, left=False)  # (g, r_in, I)
        eye = torch.eye(k, dtype=torch.float64)
        # B[(i, k'), (s, k)] = P[s, i] * delta(k', k): the projected channels at each kernel offset.
        basis = torch.einsum("gsi,ab->giasb", project_in, eye).reshape(g, d, r_in * k)
        u_out = self.u_out[:, :, :r_out]  # (g, O, r_out)
        core = least_squares_refit(u_out.transpose(1, 2) @ self.weight, self.sigma_damped, basis)
        dense = u_out @ core @ basis.transpose(1, 2)
        kernel = self.geometry.kernel
        ones = (1,) * len(kernel)
        stages = (project_in.reshape(g * r_in, i, *ones), core.reshape(g * r_out, r_in, *kernel),
                  u_out.reshape(g * o, r_out, *ones))
        return stages, dense


_FACTORIZERS: dict[str, type[LayerFactorizer]] = {
    "svd": _SVDFactorizer,
    "spatial_svd": _SpatialSVDFactorizer,
    "tucker2": _Tucker2Factorizer,
    "channel_svd": _ChannelSVDFactorizer,
}
# shift and dictionary (a fixed basis of the patch space, the 1x1 stage refit): in their own file.
from .data_aware_taps import EXTRA_FACTORIZERS  # noqa: E402

_FACTORIZERS.update(EXTRA_FACTORIZERS)


def layer_factorizer(method_name: str, layer: nn.Module, sigma: torch.Tensor, damping: float = DEFAULT_DAMPING,
                     weight: torch.Tensor | None = None) -> LayerFactorizer | None:
    """The data-aware factorizer of ``method_name`` for ``layer``, or None if the method has none."""
    cls = _FACTORIZERS.get(method_name)
    return None if cls is None else cls(layer, sigma, damping, weight)


def corrected_weight(weight: torch.Tensor, sigma: torch.Tensor, cross: torch.Tensor, damping: float) -> torch.Tensor:
    """The weight that best maps the inputs a layer now gets to the outputs it gave on the original inputs.

    Minimizes E||W p_r - W' p_w||^2 + lam ||W' - W||^2 (p_r: original patches, p_w: the patches after the
    layers before it were factorized): W' = W + W (cross^T - Sigma) (Sigma + lam I)^{-1}, with
    Sigma = E[p_w p_w^T], cross = E[p_w p_r^T] and lam = damping * mean(diag(Sigma)). It is W itself
    when the inputs are unchanged (cross = Sigma), so exactness at full rank is kept.

    Args:
        weight: (g, O, D). sigma, cross: (g, D, D).
    Returns:
        (g, O, D) float64.
    """
    weight = weight.to(torch.float64)
    mismatch = weight @ (cross.transpose(1, 2) - sigma)  # (g, O, D)
    correction = torch.linalg.solve(damped(sigma, damping), mismatch.transpose(1, 2)).transpose(1, 2)
    return weight + correction
