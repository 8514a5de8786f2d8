"""patches.gram: the blocked symmetric product equals X^T X, and Moments uses it for a self product only."""

import pytest
import torch

from convfactor.auto.statistics import patches
from convfactor.auto.statistics.patches import Moments, gram


@pytest.mark.parametrize("shape", [(40, 7), (3, 50, 257), (2, 30, 301), (64, 600)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gram_is_the_plain_product(shape, dtype):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    got = gram(x)
    want = x.transpose(-2, -1) @ x
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))
    if shape[-1] >= patches.SYMMETRIC_MIN_COLUMNS:  # blocked: exactly symmetric
        assert torch.equal(got, got.transpose(-2, -1))


def test_gram_reads_a_non_contiguous_view():
    x = torch.randn(300, 2, 270, dtype=torch.float64).transpose(0, 1)  # as Moments gets patches (g, rows, D)
    torch.testing.assert_close(gram(x), x.transpose(1, 2) @ x, rtol=1e-12, atol=1e-10)


def test_moments_use_gram_for_self_products_only(monkeypatch):
    calls = []
    real = patches.gram
    monkeypatch.setattr(patches, "gram", lambda x: calls.append(x.shape) or real(x))
    left = torch.randn(1, 80, 300, dtype=torch.float64)
    right = torch.randn(1, 80, 300, dtype=torch.float64)
    same, cross = Moments("full", 1, 300, 1), Moments("full", 1, 300, 1)
    same.add(left, left)
    cross.add(left, right)
    assert calls == [left.shape]
    torch.testing.assert_close(same.result().sigma, (left.transpose(1, 2) @ left) / 80, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cross.result().sigma, (left.transpose(1, 2) @ right) / 80, rtol=1e-12, atol=1e-12)
