"""Input-patch covariances of bounded size: full (D x D), Kronecker-factored, or diagonal.

A layer's patch p has D = C * K values (C input channels per group, K kernel taps; channel-major, as
``layer.weight[o].flatten()``). The full second moment Sigma = E[p p^T] costs 8 D^2 bytes per group:
34 GB for a 1,024-channel, 64-tap layer. When it does not fit the memory budget, a statistic that does
is used instead, and every consumer (whitening, least-squares refits, output errors, the sequential
correction) works on it without ever forming a D x D matrix:

  * ``FullCovariance``: Sigma itself, (g, D, D).
  * ``KroneckerCovariance``: Sigma ~ A (x) B with A = E[X X^T] (C x C, channels) and B = E[X^T X] / tr(A)
    (K x K, kernel taps), X the (C, K) patch; exact when channels and taps are independent, and always
    exact in trace. Memory 8 (C^2 + K^2) bytes per group.
  * ``DiagonalCovariance``: the per-value variances, (g, D): for layers whose C^2 alone is too large.

All hold float64 and share one interface; ``choose_form`` picks the form for a layer and a budget.
"""

from __future__ import annotations

import abc
import math

import torch

__all__ = ["Covariance", "FullCovariance", "KroneckerCovariance", "DiagonalCovariance", "as_covariance",
           "choose_form", "WORKING_COPIES"]

# A layer's fit holds a few matrices of the statistic's size at once (the statistic, its damped copy, a
# Cholesky factor, temporaries): its statistic may use at most 1/WORKING_COPIES of the working memory.
WORKING_COPIES = 5


def _cholesky(sigma: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of SPD (g, n, n) matrices, adding jitter when rounding made one indefinite."""
    factor, info = torch.linalg.cholesky_ex(sigma)
    jitter = 1e-12
    while bool((info > 0).any()):
        scale = sigma.diagonal(dim1=-2, dim2=-1).mean(dim=-1).clamp_min(1e-30)
        eye = torch.eye(sigma.shape[-1], dtype=sigma.dtype)
        factor, info = torch.linalg.cholesky_ex(sigma + jitter * scale[:, None, None] * eye)
        jitter *= 10
    return factor


def _ridge(matrix: torch.Tensor, amount: float) -> torch.Tensor:
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype)
    scale = matrix.diagonal(dim1=-2, dim2=-1).mean(dim=-1).clamp_min(1e-30)
    return matrix + amount * scale[:, None, None] * eye


class Covariance(abc.ABC):
    """Sigma per group, as an operator. ``W`` arguments are (g, m, D) row blocks; results likewise."""

    kind: str = ""

    @abc.abstractmethod
    def right(self, w: torch.Tensor) -> torch.Tensor:
        """W Sigma."""

    @abc.abstractmethod
    def damped(self, damping: float) -> Covariance:
        """Sigma plus a ridge of about ``damping`` times its mean diagonal."""

    @abc.abstractmethod
    def sqrt_right(self, w: torch.Tensor) -> torch.Tensor:
        """W L, for a fixed factor L with L L^T = Sigma (Sigma must be positive definite)."""

    @abc.abstractmethod
    def sqrt_right_solve(self, w: torch.Tensor) -> torch.Tensor:
        """W L^{-1} for the same L."""

    @abc.abstractmethod
    def solve_right(self, w: torch.Tensor) -> torch.Tensor:
        """W Sigma^{-1}."""

    @abc.abstractmethod
    def channel(self, kernel: int) -> Covariance:
        """The covariance of one kernel tap's channels, averaged over the ``kernel`` taps (C x C)."""

    @abc.abstractmethod
    def vertical(self, k_h: int, k_w: int) -> Covariance:
        """The covariance of the (C, k_h) column patches, averaged over the k_w columns."""

    @abc.abstractmethod
    def transposed(self) -> Covariance:
        """Sigma^T (differs from Sigma only for a cross moment)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for the report."""

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes held."""

    @abc.abstractmethod
    def diagonal(self) -> torch.Tensor:
        """The variances Sigma_ii per group, (g, D)."""

    def quad(self, w: torch.Tensor) -> float:
        """sum over groups of tr(W Sigma W^T)."""
        return float((self.right(w) * w).sum())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Sigma X for X (g, D, q) (Sigma symmetric)."""
        return self.right(x.transpose(1, 2)).transpose(1, 2)

    def refit(self, target: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """X minimizing E||T p - X B^T p||^2: T Sigma B (B^T Sigma B)^{-1}; T (g, m, D), B (g, D, q)."""
        sigma_b = self.matmul(basis)
        gram = basis.transpose(1, 2) @ sigma_b
        return torch.linalg.solve(gram, (target @ sigma_b).transpose(1, 2)).transpose(1, 2)

    def channel_refit(self, target: torch.Tensor, project: torch.Tensor, kernel: int) -> torch.Tensor:
        """``refit`` with the basis P^T (x) I_K (a channel projection P (g, r, C) at every tap): (g, m, r*K)."""
        g, r, c = project.shape
        eye = torch.eye(kernel, dtype=torch.float64)
        basis = torch.einsum("gsi,ab->giasb", project, eye).reshape(g, c * kernel, r * kernel)
        return self.refit(target, basis)


class FullCovariance(Covariance):
    """Sigma as a dense (g, D, D) tensor."""

    kind = "full"

    def __init__(self, sigma: torch.Tensor):
        self.sigma = sigma.to(torch.float64)
        self._factor: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return self.sigma.numel() * 8

    def right(self, w: torch.Tensor) -> torch.Tensor:
        return w @ self.sigma

    def diagonal(self) -> torch.Tensor:
        return self.sigma.diagonal(dim1=-2, dim2=-1)

    def damped(self, damping: float) -> FullCovariance:
        return FullCovariance(_ridge(self.sigma, damping))

    def factor(self) -> torch.Tensor:
        if self._factor is None:
            self._factor = _cholesky(self.sigma)
        return self._factor

    def sqrt_right(self, w: torch.Tensor) -> torch.Tensor:
        return w @ self.factor()

    def sqrt_right_solve(self, w: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve_triangular(self.factor(), w, upper=False, left=False)

    def solve_right(self, w: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(self.sigma, w.transpose(1, 2)).transpose(1, 2)

    def channel(self, kernel: int) -> FullCovariance:
        g, d, _ = self.sigma.shape
        c = d // kernel
        return FullCovariance(self.sigma.reshape(g, c, kernel, c, kernel).diagonal(dim1=2, dim2=4).mean(dim=-1))

    def vertical(self, k_h: int, k_w: int) -> FullCovariance:
        g, d, _ = self.sigma.shape
        c = d // (k_h * k_w)
        blocks = self.sigma.reshape(g, c, k_h, k_w, c, k_h, k_w)
        return FullCovariance(blocks.diagonal(dim1=3, dim2=6).mean(dim=-1).reshape(g, c * k_h, c * k_h))

    def transposed(self) -> FullCovariance:
        return FullCovariance(self.sigma.transpose(1, 2))

    def describe(self) -> str:
        g, d, _ = self.sigma.shape
        return f"full patch covariance ({d} x {d}{'' if g == 1 else f', {g} groups'})"


def _apply_kron(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, op) -> torch.Tensor:
    """W reshaped (g, m, C, K): ``op(x, factor)`` applied on the K axis with b, then on the C axis with a."""
    g, m, _ = w.shape
    c, k = a.shape[-1], b.shape[-1]
    x = op(w.reshape(g, m * c, k), b)  # (g, m*C, K)
    x = x.reshape(g, m, c, k).transpose(2, 3).reshape(g, m * k, c)
    x = op(x, a)  # (g, m*K, C)
    return x.reshape(g, m, k, c).transpose(2, 3).reshape(g, m, c * k)


class KroneckerCovariance(Covariance):
    """Sigma ~ A (x) B per group: A (g, C, C) over channels, B (g, K, K) over kernel taps."""

    kind = "kronecker"

    def __init__(self, a: torch.Tensor, b: torch.Tensor, note: str = ""):
        self.a, self.b = a.to(torch.float64), b.to(torch.float64)
        self.note = note
        self._factors: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        return (self.a.numel() + self.b.numel()) * 8

    def right(self, w: torch.Tensor) -> torch.Tensor:
        return _apply_kron(w, self.a, self.b, torch.matmul)

    def diagonal(self) -> torch.Tensor:
        # diag(A (x) B)[(c, t)] = A_cc B_tt, channel-major like the patch.
        a, b = self.a.diagonal(dim1=-2, dim2=-1), self.b.diagonal(dim1=-2, dim2=-1)
        return (a[:, :, None] * b[:, None, :]).reshape(a.shape[0], -1)

    def damped(self, damping: float) -> KroneckerCovariance:
        # (A + t a I) (x) (B + t b I) adds about (2t + t^2) = damping times the mean diagonal.
        t = math.sqrt(1.0 + damping) - 1.0
        return KroneckerCovariance(_ridge(self.a, t), _ridge(self.b, t), self.note)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._factors is None:
            self._factors = (_cholesky(self.a), _cholesky(self.b))
        return self._factors

    def sqrt_right(self, w: torch.Tensor) -> torch.Tensor:
        l_a, l_b = self.factors()
        return _apply_kron(w, l_a, l_b, torch.matmul)

    def sqrt_right_solve(self, w: torch.Tensor) -> torch.Tensor:
        l_a, l_b = self.factors()
        return _apply_kron(w, l_a, l_b, lambda x, f: torch.linalg.solve_triangular(f, x, upper=False, left=False))

    def solve_right(self, w: torch.Tensor) -> torch.Tensor:
        return _apply_kron(w, self.a, self.b, lambda x, f: torch.linalg.solve(f, x.transpose(1, 2)).transpose(1, 2))

    def channel(self, kernel: int) -> FullCovariance:
        return FullCovariance(self.a * self.b.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None])

    def vertical(self, k_h: int, k_w: int) -> KroneckerCovariance:
        g = self.b.shape[0]
        b_v = self.b.reshape(g, k_h, k_w, k_h, k_w).diagonal(dim1=2, dim2=4).mean(dim=-1)
        return KroneckerCovariance(self.a, b_v, self.note)

    def transposed(self) -> KroneckerCovariance:
        return KroneckerCovariance(self.a.transpose(1, 2), self.b.transpose(1, 2), self.note)

    def channel_refit(self, target: torch.Tensor, project: torch.Tensor, kernel: int) -> torch.Tensor:
        # Sigma B = (A P^T) (x) B_k and B^T Sigma B = (P A P^T) (x) B_k: B_k cancels, so
        # X = T (M (x) I_K) with M = A P^T (P A P^T)^{-1}, applied per tap.
        a_p = self.a @ project.transpose(1, 2)  # (g, C, r)
        m = torch.linalg.solve(project @ a_p, a_p.transpose(1, 2)).transpose(1, 2)  # (g, C, r)
        g, rows, _ = target.shape
        c, r = m.shape[1:]
        x = torch.einsum("gmck,gcs->gmsk", target.reshape(g, rows, c, kernel), m)
        return x.reshape(g, rows, r * kernel)

    def describe(self) -> str:
        g, c, _ = self.a.shape
        k = self.b.shape[-1]
        text = f"Kronecker-factored covariance: channels ({c} x {c}) (x) kernel taps ({k} x {k})"
        return text + (f", {g} groups" if g > 1 else "") + (f"; {self.note}" if self.note else "")


class DiagonalCovariance(Covariance):
    """Sigma ~ diag(v), v (g, D): the variance of every patch value, correlations dropped."""

    kind = "diagonal"

    def __init__(self, variances: torch.Tensor, note: str = ""):
        self.v = variances.to(torch.float64)
        self.note = note

    @property
    def nbytes(self) -> int:
        return self.v.numel() * 8

    def right(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.v[:, None, :]

    def diagonal(self) -> torch.Tensor:
        return self.v

    def damped(self, damping: float) -> DiagonalCovariance:
        return DiagonalCovariance(self.v + damping * self.v.mean(-1, keepdim=True).clamp_min(1e-30), self.note)

    def sqrt_right(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.v.sqrt()[:, None, :]

    def sqrt_right_solve(self, w: torch.Tensor) -> torch.Tensor:
        return w / self.v.sqrt()[:, None, :]

    def solve_right(self, w: torch.Tensor) -> torch.Tensor:
        return w / self.v[:, None, :]

    def channel(self, kernel: int) -> DiagonalCovariance:
        g, d = self.v.shape
        return DiagonalCovariance(self.v.reshape(g, d // kernel, kernel).mean(-1), self.note)

    def vertical(self, k_h: int, k_w: int) -> DiagonalCovariance:
        g, d = self.v.shape
        return DiagonalCovariance(self.v.reshape(g, d // (k_h * k_w), k_h, k_w).mean(-1).reshape(g, -1), self.note)

    def transposed(self) -> DiagonalCovariance:
        return self

    def channel_refit(self, target: torch.Tensor, project: torch.Tensor, kernel: int) -> torch.Tensor:
        # Approximation: the channel variances (averaged over taps) as the channel metric, as for Kronecker.
        channel = self.channel(kernel).v  # (g, C)
        a_p = channel[:, :, None] * project.transpose(1, 2)
        m = torch.linalg.solve(project @ a_p, a_p.transpose(1, 2)).transpose(1, 2)
        g, rows, _ = target.shape
        c, r = m.shape[1:]
        return torch.einsum("gmck,gcs->gmsk", target.reshape(g, rows, c, kernel), m).reshape(g, rows, r * kernel)

    def describe(self) -> str:
        g, d = self.v.shape
        text = f"diagonal covariance (per-value variances of the {d}-value patch, correlations dropped)"
        return text + (f"; {self.note}" if self.note else "")


def as_covariance(sigma: torch.Tensor | Covariance) -> Covariance:
    """A dense (g, D, D) tensor wrapped as a ``FullCovariance``; a ``Covariance`` as is."""
    return sigma if isinstance(sigma, Covariance) else FullCovariance(sigma)


def choose_form(groups: int, channels: int, kernel: int, budget: float) -> tuple[str, str]:
    """("full" | "kronecker" | "diagonal", why) for a layer whose statistic may use ``budget`` bytes.

    The statistic is full when WORKING_COPIES of it fit the budget, else Kronecker when that fits,
    else diagonal.
    """
    d = channels * kernel
    full = 8 * groups * d * d
    if WORKING_COPIES * full <= budget:
        return "full", ""
    why = f"full {d} x {d} covariance ({full / 2**20:.0f} MiB per copy) exceeds the memory budget"
    if kernel > 1 and WORKING_COPIES * 8 * groups * (channels**2 + kernel**2) <= budget:
        return "kronecker", why
    return "diagonal", why + (" (so does a channel covariance)" if kernel > 1 else "")
