"""Products of a layer's weight and input covariance with a nested basis ``F (x) I_J``, for a rank grid.

Spatial SVD's and Tucker-2's data-aware fits refit their last stage by least squares on a basis B whose
columns are a factor's columns F[:, t] repeated at each of J positions: B[(x, j'), (t, j)] = F[x, t] delta(j, j')
(rows in the patch order (x, j), x the other patch axes). Spatial SVD: F the vertical filters over
(channel, row tap), J = k_w column taps; Tucker-2: F the input projection over channels, J = the kernel
volume. Rank r uses the first r*J columns and no column changes once made, so a rank grid pays for each
column once (``NestedProducts.extend``) and slices for smaller ranks.

The block structure is used in every product: with a full covariance Sigma B costs D^2 r (not D^2 r J: one
multiply per nonzero of B), B^T (Sigma B) costs D r m for m columns (not D r J m), and B^T B is F^T F (x) I_J.
On a 512-channel 3x3 layer that is a third of the dense products' cost for spatial SVD and a ninth for
Tucker-2.
"""

from __future__ import annotations

import torch

from ..statistics.covariance import Covariance, FullCovariance, KroneckerCovariance

__all__ = ["NestedProducts", "expand_basis"]


def expand_basis(factor: torch.Tensor, repeat: int) -> torch.Tensor:
    """The dense basis F (x) I_J, (g, X*J, r*J), of a factor F (g, X, r): rows (x, j'), columns (t, j)."""
    g, x, r = factor.shape
    eye = torch.eye(repeat, dtype=factor.dtype)
    return torch.einsum("gxt,ab->gxatb", factor, eye).reshape(g, x * repeat, r * repeat)


def _basis_t(factor: torch.Tensor, repeat: int, y: torch.Tensor) -> torch.Tensor:
    """B^T Y for B = F (x) I_J and Y (g, X*J, m): (g, r*J, m), reading only B's nonzeros."""
    g, x, r = factor.shape
    m = y.shape[2]
    return torch.einsum("gxt,gxjm->gtjm", factor, y.reshape(g, x, repeat, m)).reshape(g, r * repeat, m)


def _times_basis(sigma: Covariance, factor: torch.Tensor, repeat: int) -> torch.Tensor:
    """Sigma B for B = F (x) I_J: (g, D, r*J).

    A dense Sigma is read one column block (x, j) per j (D^2 r). A Kronecker Sigma = A (x) T (channels C,
    kernel taps K = (i, j), the factor's rows x = (c, i)) needs A F once (C^2 (K/J) r) and then T on the
    taps: Sigma B[(a, p, q), (t, j)] = sum_i T[(p, q), (i, j)] (A F)[a, i, t], not A and T applied to each of
    the r*J dense columns (C K (C + K) r J)."""
    x, r = factor.shape[1:]
    if isinstance(sigma, FullCovariance):
        g, d, _ = sigma.sigma.shape
        blocks = sigma.sigma.reshape(g, d, x, repeat)  # Sigma[:, (x, j)]
        return torch.einsum("gdxj,gxt->gdtj", blocks, factor).reshape(g, d, r * repeat)
    if isinstance(sigma, KroneckerCovariance):
        g, c, _ = sigma.a.shape
        taps = x // c  # K / J
        mixed = torch.einsum("gac,gcit->gait", sigma.a, factor.reshape(g, c, taps, r))  # (g, C, K/J, r)
        kernel = sigma.b.reshape(g, taps, repeat, taps, repeat)  # T[(p, q), (i, j)]
        return torch.einsum("gait,gpqij->gapqtj", mixed, kernel).reshape(g, x * repeat, r * repeat)
    return sigma.matmul(expand_basis(factor, repeat))


def _times_factor(matrix: torch.Tensor, factor: torch.Tensor, repeat: int) -> torch.Tensor:
    """M B for M (g, m, X*J) and B = F (x) I_J: (g, m, r*J), reading only B's nonzeros."""
    g, m, _ = matrix.shape
    return torch.einsum("gmxj,gxt->gmtj", matrix.reshape(g, m, -1, repeat), factor).reshape(g, m, -1)


def _grown(block: torch.Tensor, top: torch.Tensor, corner: torch.Tensor, lower: bool = False) -> torch.Tensor:
    """The symmetric [[block, top], [top^T, corner]], or with ``lower`` the lower-triangular [[block, 0],
    [top^T, corner]]; written into one new tensor (no intermediate copies: the Gram matrices of a large
    layer's grid reach 4,000 columns, 128 MB each)."""
    g, n, _ = block.shape
    size = n + corner.shape[2]
    out = block.new_zeros(g, size, size)
    out[:, :n, :n] = block
    out[:, n:, :n] = top.transpose(1, 2)
    out[:, n:, n:] = corner
    if not lower:
        out[:, :n, n:] = top
    return out


def _grown_cholesky(factor: torch.Tensor | None, top: torch.Tensor, corner: torch.Tensor) -> torch.Tensor | None:
    """The lower Cholesky factor of [[G, top], [top^T, corner]] from G's factor L: [[L, 0], [X^T, L2]] with
    L X = top and L2 L2^T = corner - X^T X. None where a pivot is not positive (or ``factor`` was None)."""
    if factor is None:
        return None
    x = torch.linalg.solve_triangular(factor, top, upper=False)  # (g, n, m)
    l2, info = torch.linalg.cholesky_ex(corner - x.transpose(1, 2) @ x)
    if bool((info != 0).any()):
        return None
    return _grown(factor, x, l2, lower=True)


class NestedProducts:
    """W and Sigma_d against the leading r*J columns of the basis B = F (x) I_J: B^T Sigma_d B and W Sigma_d B,
    extended when r grows and sliced for smaller r. The output error of W_hat = A B^T follows from products
    with the undamped Sigma: tr(E Sigma E^T) = tr(W Sigma W^T) - 2 <A, W Sigma B> + <A, A B^T Sigma B>, no
    D x D product per rank. With an exact ridge (Sigma_d = Sigma + lam I, full statistics) those are the
    damped ones less lam B^T B and lam W B (kept instead); otherwise (Kronecker or diagonal statistics)
    B^T Sigma B and W Sigma B are kept beside the damped ones.

    Args:
        weight: W, (g, O, D). sigma, sigma_damped: the layer's patch covariance and its damped form.
        factor: F, (g, X, R) with X * J = D: every column the grid may use (its leading ones first).
        repeat: J.
    """

    def __init__(self, weight: torch.Tensor, sigma: Covariance, sigma_damped: Covariance, factor: torch.Tensor,
                 repeat: int):
        self.weight, self.sigma, self.sigma_damped = weight, sigma, sigma_damped
        self.factor, self.repeat = factor, repeat
        full = isinstance(sigma, FullCovariance) and isinstance(sigma_damped, FullCovariance)
        self.ridge = (sigma_damped.diagonal() - sigma.diagonal()).mean(dim=-1) if full else None
        g, o, _ = weight.shape
        empty = weight.new_zeros
        self.gram, self.weight_sigma = empty(g, 0, 0), empty(g, o, 0)
        self._rows: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._chol: torch.Tensor | None = empty(g, 0, 0)  # Cholesky factor of ``gram``; None: not positive definite
        # The undamped products' corrections (B^T B, W B) with a ridge, else the products themselves.
        self.plain_gram, self.plain_cross = empty(g, 0, 0), empty(g, o, 0)

    @property
    def rank(self) -> int:
        """Factor columns covered so far."""
        return self.gram.shape[2] // self.repeat

    def basis(self, rank: int) -> torch.Tensor:
        """The dense basis of the first ``rank`` factor columns, (g, D, rank*J)."""
        return expand_basis(self.factor[:, :, :rank], self.repeat)

    def extend(self, rank: int) -> None:
        """Products for the first ``rank`` factor columns (those not yet covered)."""
        have, j = self.rank, self.repeat
        if rank <= have:
            return
        old, new = self.factor[:, :, :have], self.factor[:, :, have:rank]
        sigma_new = _times_basis(self.sigma_damped, new, j)
        top, corner = _basis_t(old, j, sigma_new), _basis_t(new, j, sigma_new)
        self.gram = _grown(self.gram, top, corner)
        self._chol = _grown_cholesky(self._chol, top, corner)
        self.weight_sigma = torch.cat([self.weight_sigma, _times_factor(self._sigma_rows()[0], new, j)], dim=2)
        if self.ridge is not None:  # B^T B = F^T F (x) I_J and W B, read off the factor
            overlap = expand_basis(old.transpose(1, 2) @ new, j), expand_basis(new.transpose(1, 2) @ new, j)
            self.plain_gram = _grown(self.plain_gram, *overlap)
            plain = _times_factor(self.weight, new, j)
        else:
            plain_new = _times_basis(self.sigma, new, j)
            self.plain_gram = _grown(self.plain_gram, _basis_t(old, j, plain_new), _basis_t(new, j, plain_new))
            plain = _times_factor(self._sigma_rows()[1], new, j)
        self.plain_cross = torch.cat([self.plain_cross, plain], dim=2)

    def _sigma_rows(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W Sigma_d, W Sigma) as (g, O, D), made once: W Sigma B is then (W Sigma) B read through B's
        nonzeros (O D r per extension, not O D r J). W Sigma only without a ridge (its products are kept)."""
        if self._rows is None:
            self._rows = (self.sigma_damped.right(self.weight),
                          None if self.ridge is not None else self.sigma.right(self.weight))
        return self._rows

    def solve(self, rhs: torch.Tensor, rank: int) -> torch.Tensor:
        """X = R (B^T Sigma_d B)^-1 for R (g, m, rank*J), the products extended to ``rank``: the least-squares
        refit on the first ``rank`` factor columns. The Cholesky factor of a leading block of the Gram matrix
        is the leading block of its factor, so every rank's solve reads the one factor grown with the products
        (two triangular solves instead of an LU per rank)."""
        columns = rank * self.repeat
        if self._chol is None:  # not numerically positive definite: a general solve
            return torch.linalg.solve(self.gram[:, :columns, :columns], rhs.transpose(1, 2)).transpose(1, 2)
        return torch.cholesky_solve(rhs.transpose(1, 2), self._chol[:, :columns, :columns]).transpose(1, 2)

    def error(self, a: torch.Tensor, rank: int, signal: float) -> float:
        """tr(E Sigma E^T) for W_hat = A B^T, A (g, O, rank*J), the products extended to ``rank``."""
        columns = rank * self.repeat
        cross, gram = self.plain_cross[:, :, :columns], self.plain_gram[:, :columns, :columns]
        if self.ridge is not None:
            lam = self.ridge[:, None, None]
            cross = self.weight_sigma[:, :, :columns] - lam * cross  # W Sigma B
            gram = self.gram[:, :columns, :columns] - lam * gram  # B^T Sigma B
        return max(signal - 2 * float((a * cross).sum()) + float((a * (a @ gram)).sum()), 0.0)
