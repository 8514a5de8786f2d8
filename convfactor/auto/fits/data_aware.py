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

Sigma is any ``convfactor.auto.statistics.covariance.Covariance`` (full, Kronecker-factored or diagonal: no step
forms a D x D matrix unless the statistic is one). It is damped by ``damping * mean(diag(Sigma))`` before
whitening so that directions the calibration data never excites stay well-posed (and weight-like).
Every factorization is exact at full rank.
Sequential mode (``corrected_weight``) first moves W to the weight that best maps the inputs the layer
gets after earlier layers were factorized to its original outputs, so errors do not accumulate.
Weights are computed in float64 and stored in the module's dtype.
"""

from __future__ import annotations

import abc

import torch
from torch import nn

from ...geometry import LayerGeometry
from ...methods import get_method
from ...methods._stages import set_weight
from ...methods.base import FactorizedLayer, Rank
from ..statistics.covariance import Covariance, FullCovariance, as_covariance
from ..statistics.patches import WeightCross
from .nested import NestedProducts

__all__ = [
    "DEFAULT_DAMPING",
    "damped",
    "output_error2",
    "least_squares_refit",
    "whitened_svd_factors",
    "LayerFactorizer",
    "SVD_FACTORIZERS",
    "corrected_weight",
    "grouped_weight",
]

# Ridge added to Sigma, relative to its mean diagonal (as in GPTQ's 1% dampening): keeps the whitening
# well conditioned and lets low-variance directions fall back towards plain weight fitting.
DEFAULT_DAMPING = 1e-2


def damped(sigma: torch.Tensor | Covariance, damping: float) -> Covariance:
    """Sigma + about damping * mean(diag(Sigma)) * I, per group (see ``Covariance.damped``)."""
    return as_covariance(sigma).damped(damping)


def grouped_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(C_out, C_in/g, *k) or Linear (C_out, C_in) -> (g, C_out/g, C_in/g * K), float64, patch order."""
    w = weight.detach().to(torch.float64)
    return w.reshape(groups, w.shape[0] // groups, -1)


def output_error2(weight: torch.Tensor, approx: torch.Tensor, sigma: torch.Tensor | Covariance,
                  signal: float | None = None) -> float:
    """E||(W - W_hat) p||^2 / E||W p||^2 for grouped weights (g, O, D) and the patch covariance.

    ``signal``: E||W p||^2 when already known (a rank grid scores one layer many times: each quad of a
    large layer costs O * D^2).
    """
    sigma = as_covariance(sigma)
    error = sigma.quad(weight - approx)
    if signal is None:
        signal = sigma.quad(weight)
    return error / signal if signal > 0 else error


def least_squares_refit(target: torch.Tensor, sigma: torch.Tensor | Covariance, basis: torch.Tensor) -> torch.Tensor:
    """The X minimizing E||T p - X B^T p||^2 over p with E[p p^T] = Sigma: X = T Sigma B (B^T Sigma B)^{-1}.

    Args:
        target: T, (g, m, D). sigma: (g, D, D) or a ``Covariance``, SPD. basis: B, (g, D, q), independent columns.
    Returns:
        X, (g, m, q).
    """
    return as_covariance(sigma).refit(target, basis)


def whitened_svd_factors(weight: torch.Tensor, sigma: torch.Tensor | Covariance,
                         rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors of W minimizing tr((W - W_hat) Sigma (W - W_hat)^T), per group.

    Args:
        weight: (g, O, D). sigma: (g, D, D) or a ``Covariance``, SPD (already damped).
    Returns:
        first (g, r, D) and second (g, O, r) with W_hat = second @ first.
    """
    return _WhitenedSVD(weight, as_covariance(sigma)).factors(rank)


class _WhitenedSVD:
    """The SVD of W L (L L^T = Sigma), computed once; truncated at any rank."""

    def __init__(self, weight: torch.Tensor, sigma: Covariance):
        self.sigma = sigma
        self.u, self.s, self.vh = torch.linalg.svd(sigma.sqrt_right(weight), full_matrices=False)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        root = self.s[:, :rank].sqrt()
        left = self.vh[:, :rank, :] * root[:, :, None]  # (g, r, D): rows of sqrt(S) V^T
        first = self.sigma.sqrt_right_solve(left)  # left L^{-1}
        second = self.u[:, :, :rank] * root[:, None, :]
        return first, second


class LayerFactorizer(abc.ABC):
    """One layer's data-aware decomposition, set up once and truncated at any rank.

    Args:
        layer: the Conv/Linear layer (its weight and bias are read, never changed).
        sigma: the covariance of its input patches (``LayerStatistics.covariance``, or a (g, D, D) tensor).
        damping: ridge relative to the mean diagonal of sigma.
        weight: (g, O, D) weight to approximate instead of the layer's own (see ``corrected_weight``).
    """

    method_name: str = ""
    progress: bool | str = False  # a fit long enough to need its own bar shows one (sal's per-channel solves)

    def __init__(self, layer: nn.Module, sigma: torch.Tensor | Covariance, damping: float = DEFAULT_DAMPING,
                 weight: torch.Tensor | None = None):
        self.layer = layer
        self.geometry = LayerGeometry.of(layer)
        own = grouped_weight(layer.weight, self.geometry.groups)
        self.weight = own if weight is None else weight.to(torch.float64)  # (g, O, D)
        self.sigma = as_covariance(sigma)
        self.sigma_damped = self.sigma.damped(damping)
        self._signal: float | None = None

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

    @property
    def signal(self) -> float:
        """E||W p||^2 of the approximated weight (the relative error's denominator), computed once; set where
        already known (the methods scoring one layer share it)."""
        if self._signal is None:
            self._signal = self.sigma.quad(self.weight)
        return self._signal

    @signal.setter
    def signal(self, value: float) -> None:
        self._signal = value

    def error2(self, rank: Rank) -> float:
        """Relative squared output error of the rank-``rank`` factors on the calibration inputs."""
        error = self.sigma.quad(self.weight - self.factors(rank)[1])
        return error / self.signal if self.signal > 0 else error


class _SVDFactorizer(LayerFactorizer):
    method_name = "svd"

    def __init__(self, layer: nn.Module, sigma: torch.Tensor | Covariance, damping: float = DEFAULT_DAMPING,
                 weight: torch.Tensor | None = None):
        super().__init__(layer, sigma, damping, weight)
        self.svd = _WhitenedSVD(self.weight, self.sigma_damped)

    def factors(self, rank: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        first, second = self.svd.factors(rank)
        g, o, d = self.weight.shape
        return (first.reshape(g * rank, d), second.reshape(g * o, rank)), second @ first


class _ChannelSVDFactorizer(_SVDFactorizer):
    # The same whitened SVD of W as (C_out, D): channel_svd's first stage is the k x k conv.
    method_name = "channel_svd"


def _right_singular(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values S (g, k) and right singular vectors V^T (g, k, n) of each (m, n) matrix, k = min(m, n).

    From the eigendecomposition of A^T A when n <= m (0.92 s against an SVD's 1.70 s at 1536 x 1536, 1 thread:
    ``benchmarks/spatial_svd_setup.py``), else an SVD. The leading pairs, which the candidates use, are as accurate;
    the trailing values, below sqrt(eps) of the largest, are not (those of A^T A are at eps), and are
    floored at 1e-15 of the largest so that every direction keeps a nonzero scale: the vectors stay
    orthonormal, so the full-rank basis still spans everything and the refit is exact."""
    m, n = a.shape[-2:]
    if n > m:
        _, s, vh = torch.linalg.svd(a, full_matrices=False)
        return s, vh
    values, vectors = torch.linalg.eigh(a.transpose(-2, -1) @ a)  # ascending
    values, vectors = values.flip(-1), vectors.flip(-1)
    floor = (values[..., :1] * 1e-30).clamp_min(torch.finfo(values.dtype).tiny)
    return values.clamp_min(floor).sqrt(), vectors.transpose(-2, -1)


class _SpatialSVDFactorizer(LayerFactorizer):
    method_name = "spatial_svd"

    def __init__(self, layer: nn.Module, sigma: torch.Tensor | Covariance, damping: float = DEFAULT_DAMPING,
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
        sigma_v = self.sigma_damped.vertical(kh, kw)
        # (g, O, C, kh, kw) -> (g, O*kw, C*kh): the transposed spatial-SVD reshape of each group.
        matrix_t = self.weight.reshape(g, o, c, kh, kw).permute(0, 1, 4, 2, 3).reshape(g, o * kw, c * kh)
        # SVD of (L_v^T M)^T = M^T L_v = U' S V'^T: the left vectors of L_v^T M are the rows of V'^T.
        s, vh = _right_singular(sigma_v.sqrt_right(matrix_t))
        # Vertical filters V = L_v^{-T} U sqrt(S), all ranks at once (truncation keeps leading columns).
        self.vertical_all = sigma_v.sqrt_right_solve(vh * s.sqrt()[:, :, None]).transpose(1, 2)
        self.channels = c
        # The basis is every vertical output read at every column offset: B[(c, i, j'), (t, j)] =
        # V[(c, i), t] * delta(j', j). Its products with Sigma and W are made for the ranks asked so far (the
        # candidates rarely go past half the full rank).
        self.products = NestedProducts(self.weight, self.sigma, self.sigma_damped, self.vertical_all, kw)

    def _fit(self, rank: int) -> torch.Tensor:
        """The horizontal stage H at ``rank``: W_hat = H B^T, H = W Sigma_d B (B^T Sigma_d B)^-1."""
        self.products.extend(rank)
        return self.products.solve(self.products.weight_sigma[:, :, :rank * self.k_w], rank)

    def error2(self, rank: int) -> float:
        """As ``LayerFactorizer.error2``, from the fit's products (``NestedProducts``)."""
        error = self.products.error(self._fit(rank), rank, self.signal)
        return error / self.signal if self.signal > 0 else error

    def factors(self, rank: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        g, o, d = self.weight.shape
        c, kh, kw = self.channels, self.k_h, self.k_w
        vertical = self.vertical_all[:, :, :rank]  # (g, C*kh, r)
        horizontal = self._fit(rank)
        dense = horizontal @ self.products.basis(rank).transpose(1, 2)
        # (g, C*kh, r) -> (g, r, C, kh) -> (g*r, C, kh[, 1])
        vertical_w = vertical.reshape(g, c, kh, rank).permute(0, 3, 1, 2).reshape(g * rank, c, kh)
        horizontal_w = horizontal.reshape(g * o, rank, kw)  # (C_out, r, kw)
        if self.geometry.dims == 2:
            vertical_w, horizontal_w = vertical_w.unsqueeze(-1), horizontal_w.unsqueeze(-2)
        return (vertical_w, horizontal_w), dense


class _Tucker2Factorizer(LayerFactorizer):
    method_name = "tucker2"

    def __init__(self, layer: nn.Module, sigma: torch.Tensor | Covariance, damping: float = DEFAULT_DAMPING,
                 weight: torch.Tensor | None = None):
        super().__init__(layer, sigma, damping, weight)
        g, o, d = self.weight.shape
        i = self.geometry.in_channels // g
        k = d // i
        self.kernel_volume = k
        # Input-channel covariance: mean over kernel offsets of the diagonal (k, k) blocks of Sigma.
        self.sigma_c = self.sigma_damped.channel(k)
        # Whitened input unfolding: rows (o, k), columns the channels times L.
        whitened = self.sigma_c.sqrt_right(self.weight.reshape(g, o, i, k).transpose(2, 3).reshape(g, o * k, i))
        _, u_in = torch.linalg.eigh(whitened.transpose(1, 2) @ whitened)  # ascending eigenvalues
        self.u_in = u_in.flip(-1)  # (g, I, I), leading first
        # Output projection: principal directions of the layer's output on the data.
        _, u_out = torch.linalg.eigh(self.sigma_damped.right(self.weight) @ self.weight.transpose(1, 2))
        self.u_out = u_out.flip(-1)  # (g, O, O)
        # The core refit's products with the input basis P^T (x) I_K, nested in the input rank (rank r uses
        # the first r*K columns): made once per column (``NestedProducts``). project_in P = U_in~^T L^{-1}
        # acts row by row, so the rank-r projection is the first r rows of the full one.
        self.project_all = self.sigma_c.sqrt_right_solve(self.u_in.transpose(1, 2))  # (g, I, I)
        self.products = NestedProducts(self.weight, self.sigma, self.sigma_damped, self.project_all.transpose(1, 2), k)

    def _core(self, rank: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(project_in P (g, r_in, I), u_out (g, O, r_out), core (g, r_out, r_in*K)): the core refit by least
        squares on the basis P^T (x) I_K (as ``Covariance.channel_refit``), from the nested products."""
        r_in, r_out = rank
        project_in = self.project_all[:, :r_in]  # (g, r_in, I)
        products = self.products
        products.extend(r_in)
        columns = r_in * self.kernel_volume
        u_out = self.u_out[:, :, :r_out]  # (g, O, r_out)
        target_sigma_b = u_out.transpose(1, 2) @ products.weight_sigma[:, :, :columns]
        core = products.solve(target_sigma_b, r_in)
        return project_in, u_out, core

    def error2(self, rank: tuple[int, int]) -> float:
        """As ``spatial_svd``'s: W_hat = A B^T with A = U_out core, from the refit's products."""
        if self.products.ridge is None:
            return super().error2(rank)
        _, u_out, core = self._core(rank)
        error = self.products.error(u_out @ core, rank[0], self.signal)
        return error / self.signal if self.signal > 0 else error

    def factors(self, rank: tuple[int, int]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        r_in, r_out = rank
        g, o, d = self.weight.shape
        k = self.kernel_volume
        i = d // k
        if self.products.ridge is None:
            project_in = self.project_all[:, :r_in]  # (g, r_in, I)
            u_out = self.u_out[:, :, :r_out]  # (g, O, r_out)
            # The core refit on the basis P^T (x) I_K (the projected channels at each kernel offset).
            core = self.sigma_damped.channel_refit(u_out.transpose(1, 2) @ self.weight, project_in, k)
        else:
            project_in, u_out, core = self._core(rank)
        expanded = torch.einsum("gosk,gsi->goik", core.reshape(g, r_out, r_in, k), project_in)
        dense = u_out @ expanded.reshape(g, r_out, d)
        kernel = self.geometry.kernel
        ones = (1,) * len(kernel)
        stages = (project_in.reshape(g * r_in, i, *ones), core.reshape(g * r_out, r_in, *kernel),
                  u_out.reshape(g * o, r_out, *ones))
        return stages, dense


SVD_FACTORIZERS: dict[str, type[LayerFactorizer]] = {
    "svd": _SVDFactorizer,
    "spatial_svd": _SpatialSVDFactorizer,
    "tucker2": _Tucker2Factorizer,
    "channel_svd": _ChannelSVDFactorizer,
}


def corrected_weight(weight: torch.Tensor, sigma: torch.Tensor | Covariance, cross: torch.Tensor | Covariance,
                     damping: float) -> torch.Tensor:
    """The weight that best maps the inputs a layer now gets to the outputs it gave on the original inputs.

    Minimizes E||W p_r - W' p_w||^2 + lam ||W' - W||^2 (p_r: original patches, p_w: the patches after the
    layers before it were factorized): W' = W + W (cross^T - Sigma) (Sigma + lam I)^{-1}, with
    Sigma = E[p_w p_w^T], cross = E[p_w p_r^T] and lam = damping * mean(diag(Sigma)). It is W itself
    when the inputs are unchanged (cross = Sigma), so exactness at full rank is kept.

    Args:
        weight: (g, O, D). sigma, cross: (g, D, D) tensors or ``Covariance``s of one form; ``cross`` may be
            a ``WeightCross`` (W cross^T made while summing, ``paired_statistics(..., weight=W)``).
    Returns:
        (g, O, D) float64.
    """
    weight = weight.to(torch.float64)
    sigma = as_covariance(sigma)
    if isinstance(cross, WeightCross):  # W cross^T itself, read through W while the moments were summed
        mismatch = cross.of(weight) - sigma.right(weight)
    else:
        cross = as_covariance(cross)
        if isinstance(sigma, FullCovariance) and isinstance(cross, FullCovariance):
            mismatch = weight @ (cross.sigma.transpose(1, 2) - sigma.sigma)  # (g, O, D)
        else:
            mismatch = cross.transposed().right(weight) - sigma.right(weight)
    return weight + sigma.damped(damping).solve_right(mismatch)
