"""sal's per-output-channel refit (convfactor/auto/fits/taps.py): the batched solves, with the Kronecker
Gram matrices built from one-hot products, give what one explicit solve per output channel gives, in
bounded memory."""

from __future__ import annotations

import textwrap

import pytest
import torch

import convfactor
from convfactor.auto.fits import taps as data_aware_taps
from convfactor.auto.fits.taps import selection_gram, selection_refit
from convfactor.auto.statistics.covariance import DiagonalCovariance, FullCovariance, KroneckerCovariance
from convfactor.methods.sal import kernel_tap_mask
from tests.auto.conftest import inputs, tiny_resnet
from tests.methods.conftest import measure_in_subprocess

G, O, C, T, M = 2, 6, 5, 9, 2


def _spd(n: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(G, n, 2 * n, dtype=torch.float64, generator=generator)
    return x @ x.transpose(1, 2) / n + 0.01 * torch.eye(n, dtype=torch.float64)


def _sigma(form: str, generator: torch.Generator):
    if form == "full":
        return FullCovariance(_spd(C * T, generator))
    if form == "kronecker":
        return KroneckerCovariance(_spd(C, generator), _spd(T, generator))
    return DiagonalCovariance(torch.rand(G, C * T, dtype=torch.float64, generator=generator) + 0.1)


def _explicit(sigma, rows: torch.Tensor) -> torch.Tensor:
    """Sigma[S][:, S] from the dense statistic, one selection at a time."""
    dense = {"full": lambda: sigma.sigma, "kronecker": lambda: torch.stack(
        [torch.kron(sigma.a[g], sigma.b[g]) for g in range(G)]), "diagonal": lambda: torch.diag_embed(sigma.v)}
    full = dense[sigma.kind]()
    return torch.stack([torch.stack([full[g][r][:, r] for r in rows[g]]) for g in range(G)])


def _sal_rows(generator: torch.Generator) -> torch.Tensor:
    """(G, O, M*C) selections as sal makes them: M taps of every input channel, increasing."""
    mask = kernel_tap_mask(torch.rand(G, O, C, T, dtype=torch.float64, generator=generator), M)
    return torch.nonzero(mask.reshape(G, O, C * T))[:, 2].reshape(G, O, -1)


@pytest.mark.parametrize("form", ["full", "kronecker", "diagonal"])
@pytest.mark.parametrize("layout", ["sal", "any"])
def test_the_refit_equals_one_lu_solve_per_output_channel(form: str, layout: str) -> None:
    generator = torch.Generator().manual_seed(1)
    sigma = _sigma(form, generator)
    rows = _sal_rows(generator) if layout == "sal" else torch.stack(
        [torch.stack([torch.randperm(C * T, generator=generator)[:7] for _ in range(O)]) for _ in range(G)])
    gram = selection_gram(sigma, rows)
    assert torch.equal(gram, _explicit(sigma, rows))  # gathered or one-hot products: the same numbers
    w = torch.randn(G, O, C * T, dtype=torch.float64, generator=generator)
    rhs = torch.gather(sigma.right(w), 2, rows)
    expected = torch.linalg.solve(_explicit(sigma, rows), rhs[..., None])[..., 0]
    got = selection_refit(w, sigma, rows)
    assert float((got - expected).norm() / expected.norm()) < 1e-8  # measured: ~1e-16


_MEASURE = textwrap.dedent("""
    import json, resource, sys
    import torch
    from torch import nn
    torch.set_num_threads(1)
    from convfactor.auto.statistics.covariance import KroneckerCovariance
    from convfactor.auto.fits.registry import layer_factorizer
    channels, out = int(sys.argv[1]), int(sys.argv[2])
    layer = nn.Conv2d(channels, out, 3, padding=1).double()
    a = torch.eye(channels, dtype=torch.float64)[None] + 0.1
    b = torch.eye(9, dtype=torch.float64)[None] + 0.05
    factorizer = layer_factorizer("sal", layer, KroneckerCovariance(a, b))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    factorizer.factors(2)
    print(json.dumps({"peak_delta_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
""")


def test_the_sal_refit_of_a_wide_layer_stays_in_bounded_memory() -> None:
    """1,024 -> 4 channels, 3x3, m = 2, Kronecker statistic: D = 9,216, so Sigma as a D x D matrix would be
    648 MiB; the refit holds O x D values, a (2,048 x 2,048) Gram batch of 32 MiB and its factors."""
    measured = measure_in_subprocess(_MEASURE, "1024", "4")
    assert measured["peak_delta_mib"] < 200, measured


def test_a_long_refit_shows_the_channels_solved(monkeypatch, capsys) -> None:
    generator = torch.Generator().manual_seed(3)
    sigma = _sigma("full", generator)
    rows = _sal_rows(generator)
    w = torch.randn(G, O, C * T, dtype=torch.float64, generator=generator)
    selection_refit(w, sigma, rows, progress="lines")  # 2 x 6 x 10^3 flops: short, no bar
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(data_aware_taps, "_LONG_REFIT", 0)
    selection_refit(w, sigma, rows, progress=False)
    assert capsys.readouterr().err == ""
    selection_refit(w, sigma, rows, progress="lines")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"sal refit: started ({O} channels)" and lines[-1].startswith(f"sal refit: {O}/{O} channels")


def test_factorize_passes_its_progress_to_a_long_sal_refit(monkeypatch, capsys) -> None:
    monkeypatch.setattr(data_aware_taps, "_LONG_REFIT", 0)
    x = inputs(8, seed=2)
    convfactor.factorize(tiny_resnet(seed=1), {"rules": [{"match": "layer1.0.conv1", "method": "sal", "rank": 2}]},
                         x[:1], calibration=x, progress="lines")
    assert "sal refit: started (8 channels)" in capsys.readouterr().err
