"""Covariance.diagonal: every bounded form gives the variances its dense equivalent has on its diagonal."""

import torch

from convfactor.auto.statistics.covariance import DiagonalCovariance, FullCovariance, KroneckerCovariance


def _spd(g: int, n: int, seed: int) -> torch.Tensor:
    x = torch.randn(g, n, 3 * n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x @ x.transpose(1, 2) / (3 * n)


def test_kronecker_diagonal_is_the_dense_kronecker_diagonal():
    a, b = _spd(2, 4, 0), _spd(2, 3, 1)  # channels 4, taps 3: patch index c * 3 + t
    dense = torch.stack([torch.kron(a[i], b[i]) for i in range(2)])
    got = KroneckerCovariance(a, b).diagonal()
    torch.testing.assert_close(got, dense.diagonal(dim1=-2, dim2=-1), rtol=1e-12, atol=0)


def test_full_and_diagonal_forms():
    sigma = _spd(1, 6, 2)
    torch.testing.assert_close(FullCovariance(sigma).diagonal(), sigma.diagonal(dim1=-2, dim2=-1), rtol=0, atol=0)
    v = torch.rand(3, 5, dtype=torch.float64)
    torch.testing.assert_close(DiagonalCovariance(v).diagonal(), v, rtol=0, atol=0)
