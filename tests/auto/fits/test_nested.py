"""NestedProducts reads only the nonzeros of F (x) I_J and grows one Cholesky factor: the same products and
solves as the dense basis gives, extended in any order."""

from __future__ import annotations

import pytest
import torch

from convfactor.auto.fits.nested import NestedProducts, expand_basis
from convfactor.auto.statistics.covariance import DiagonalCovariance, FullCovariance, KroneckerCovariance

G, X, J, O = 2, 5, 3, 4  # groups, factor rows, repeat, output rows: D = 15


def _covariance(form: str):
    if form == "kronecker":  # channels X, taps J (the patch order (x, j) is channel-major)
        a, b = torch.randn(G, X, 2 * X, dtype=torch.float64), torch.randn(G, J, 2 * J, dtype=torch.float64)
        return KroneckerCovariance(a @ a.transpose(1, 2), b @ b.transpose(1, 2))
    x = torch.randn(G, X * J, 3 * X * J, dtype=torch.float64)
    sigma = x @ x.transpose(1, 2)
    return DiagonalCovariance(sigma.diagonal(dim1=1, dim2=2)) if form == "diagonal" else FullCovariance(sigma)


def _dense(sigma, w):
    return sigma.right(w.transpose(1, 2)).transpose(1, 2)  # Sigma W for W (g, D, q)


@pytest.mark.parametrize("form", ["full", "kronecker", "diagonal"])
def test_products_and_solves_equal_the_dense_basis(form):
    torch.manual_seed(0)
    sigma = _covariance(form)
    damped = sigma.damped(1e-2)
    weight = torch.randn(G, O, X * J, dtype=torch.float64)
    factor = torch.randn(G, X, X, dtype=torch.float64)
    products = NestedProducts(weight, sigma, damped, factor, J)
    for rank in (2, 4, 1, 5):  # extended and sliced
        products.extend(rank)
        basis = expand_basis(factor[:, :, :rank], J)
        columns = rank * J
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
    sigma = _covariance("full")
    factor = torch.randn(G, X, 3, dtype=torch.float64)
    factor[:, :, 2] = factor[:, :, 1]
    products = NestedProducts(torch.randn(G, O, X * J, dtype=torch.float64), sigma, sigma, factor, J)
    products.extend(2)
    assert products._chol is not None
    products.extend(3)
    assert products._chol is None
