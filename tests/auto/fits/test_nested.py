"""NestedProducts reads only the nonzeros of F (x) I_J and grows one Cholesky factor: the same products and
solves as the dense basis gives, extended in any order."""

from __future__ import annotations

import pytest
import torch

from convfactor.auto.fits.nested import NestedProducts, expand_basis
from convfactor.auto.statistics.covariance import DiagonalCovariance, FullCovariance, KroneckerCovariance

G, O = 2, 4  # groups, output rows
# (channels C, taps per factor row T, repeat J): factor rows x = (c, t), patch rows (c, t, j), D = C T J.
# (5, 1, 3) is Tucker-2's layout (x = channel, J = kernel volume); (2, 3, 2) spatial SVD's (x = (channel,
# row tap), J = column taps), where a Kronecker statistic's tap factor mixes t and j.
LAYOUTS = [(5, 1, 3), (2, 3, 2)]


def _covariance(form: str, c: int, t: int, j: int):
    if form == "kronecker":  # channels (x) kernel taps (t, j), channel-major like the patch
        a, b = torch.randn(G, c, 2 * c, dtype=torch.float64), torch.randn(G, t * j, 2 * t * j, dtype=torch.float64)
        return KroneckerCovariance(a @ a.transpose(1, 2), b @ b.transpose(1, 2))
    x = torch.randn(G, c * t * j, 3 * c * t * j, dtype=torch.float64)
    sigma = x @ x.transpose(1, 2)
    return DiagonalCovariance(sigma.diagonal(dim1=1, dim2=2)) if form == "diagonal" else FullCovariance(sigma)


def _dense(sigma, w):
    return sigma.right(w.transpose(1, 2)).transpose(1, 2)  # Sigma W for W (g, D, q)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["tucker2", "spatial_svd"])
@pytest.mark.parametrize("form", ["full", "kronecker", "diagonal"])
def test_products_and_solves_equal_the_dense_basis(form, layout):
    torch.manual_seed(0)
    c, t, j = layout
    rows = c * t  # factor rows
    sigma = _covariance(form, c, t, j)
    damped = sigma.damped(1e-2)
    weight = torch.randn(G, O, rows * j, dtype=torch.float64)
    factor = torch.randn(G, rows, rows, dtype=torch.float64)
    products = NestedProducts(weight, sigma, damped, factor, j)
    for rank in (2, 4, 1, rows):  # extended and sliced
        products.extend(rank)
        basis = expand_basis(factor[:, :, :rank], j)
        columns = rank * j
        gram = basis.transpose(1, 2) @ _dense(damped, basis)
        assert products.gram[:, :columns, :columns] == pytest.approx(gram, rel=1e-10, abs=1e-9)
        assert products.weight_sigma[:, :, :columns] == pytest.approx(weight @ _dense(damped, basis), rel=1e-10,
                                                                      abs=1e-9)
        rhs = torch.randn(G, O, columns, dtype=torch.float64)
        expected = torch.linalg.solve(gram, rhs.transpose(1, 2)).transpose(1, 2)
        assert products.solve(rhs, rank) == pytest.approx(expected, rel=1e-8, abs=1e-10)
        # The undamped error of W_hat = A B^T from the products, against the dense quad.
        a = torch.randn(G, O, columns, dtype=torch.float64)
        error = weight - a @ basis.transpose(1, 2)
        signal = sigma.quad(weight)
        assert products.error(a, rank, signal) == pytest.approx(sigma.quad(error), rel=1e-9)


def test_a_gram_that_is_not_positive_definite_is_solved_generally():
    """Repeated factor columns make B^T Sigma B singular to rounding: the Cholesky factor is dropped, not used."""
    torch.manual_seed(0)
    c, t, j = LAYOUTS[0]
    sigma = _covariance("full", c, t, j)
    factor = torch.randn(G, c * t, 3, dtype=torch.float64)
    factor[:, :, 2] = factor[:, :, 1]
    products = NestedProducts(torch.randn(G, O, c * t * j, dtype=torch.float64), sigma, sigma, factor, j)
    products.extend(2)
    assert products._chol is not None
    products.extend(3)
    assert products._chol is None
