"""The selection and dictionary refits of convfactor/auto/fits/taps.py: the same least squares as the
explicit basis, for every covariance form, in bounded memory."""

from __future__ import annotations

import textwrap

import pytest
import torch

from convfactor.auto.fits.taps import dictionary_refit, selection_refit
from convfactor.auto.statistics.covariance import DiagonalCovariance, FullCovariance, KroneckerCovariance
from tests.methods.conftest import measure_in_subprocess

G, O, C, T, K = 2, 5, 3, 9, 4


def _spd(n: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(G, n, 3 * n, dtype=torch.float64, generator=generator)
    return x @ x.transpose(1, 2) / n


def _forms(generator: torch.Generator) -> list:
    return [FullCovariance(_spd(C * T, generator)),
            KroneckerCovariance(_spd(C, generator), _spd(T, generator)),
            DiagonalCovariance(torch.rand(G, C * T, dtype=torch.float64, generator=generator) + 0.1)]


@pytest.mark.parametrize("form", [0, 1, 2], ids=["full", "kronecker", "diagonal"])
def test_refits_equal_the_explicit_basis_least_squares(form: int) -> None:
    generator = torch.Generator().manual_seed(0)
    sigma = _forms(generator)[form]
    w = torch.randn(G, O, C * T, dtype=torch.float64, generator=generator)
    atoms = torch.randn(K, T, dtype=torch.float64, generator=generator)
    basis = torch.einsum("ab,jt->atbj", torch.eye(C, dtype=torch.float64), atoms).reshape(1, C * T, C * K)
    expected = sigma.refit(w, basis.expand(G, -1, -1).contiguous())
    assert torch.allclose(dictionary_refit(w, sigma, atoms), expected, rtol=0, atol=1e-12)
    rows = torch.stack([torch.randperm(C * T, generator=generator)[:7] for _ in range(G)])
    selection = torch.zeros(G, C * T, 7, dtype=torch.float64)
    for g in range(G):
        selection[g, rows[g], torch.arange(7)] = 1.0
    expected = sigma.refit(w, selection)
    assert torch.allclose(selection_refit(w, sigma, rows), expected, rtol=0, atol=1e-12)
    per_output = rows[:, None, :].expand(-1, O, -1).contiguous()
    assert torch.allclose(selection_refit(w, sigma, per_output), expected, rtol=0, atol=1e-12)


_MEASURE = textwrap.dedent("""
    import json, resource, sys
    import torch
    from torch import nn
    torch.set_num_threads(1)
    from convfactor.auto.statistics.covariance import KroneckerCovariance
    from convfactor.auto.fits.registry import layer_factorizer
    from convfactor.methods import get_method
    get_method("dictionary").alpha = 0.0  # the least-squares dictionary: no lasso time
    channels, out = int(sys.argv[1]), int(sys.argv[2])
    g = torch.Generator().manual_seed(0)
    layer = nn.Conv2d(channels, out, 3, padding=1).double()
    a = torch.eye(channels, dtype=torch.float64)[None] + 0.1
    b = torch.eye(9, dtype=torch.float64)[None]
    sigma = KroneckerCovariance(a, b)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    layer_factorizer("dictionary", layer, sigma).factors(2)
    print(json.dumps({"peak_delta_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
""")


def test_the_dictionary_refit_of_a_wide_layer_stays_in_bounded_memory() -> None:
    """2,048 -> 16 channels, 3x3, K = 2, Kronecker statistic: the explicit D x (C*K) dictionary basis and
    its Sigma B would be 18,432 x 4,096 doubles, 576 MiB each; the refit needs O(O * D), K x K and C x C."""
    measured = measure_in_subprocess(_MEASURE, "2048", "16")
    assert measured["peak_delta_mib"] < 200, measured
