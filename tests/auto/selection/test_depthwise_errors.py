"""Depthwise's output errors at every multiplier, from one SVD, equal decomposing and scoring each multiplier."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from convfactor.auto.fits.data_aware import grouped_weight, output_error2
from convfactor.auto.options import AutoOptions
from convfactor.auto.selection.depthwise_errors import DepthwiseOutputErrors
from convfactor.auto.selection.plans import LayerPlan
from convfactor.auto.selection.scoring import error_function
from convfactor.auto.statistics.covariance import FullCovariance
from convfactor.methods import get_method

LAYERS = {
    "conv2d": lambda: nn.Conv2d(8, 12, 3),
    "grouped": lambda: nn.Conv2d(8, 12, (3, 2), groups=2, bias=False),
    "conv1d": lambda: nn.Conv1d(6, 5, 4, dilation=2),
    "wide": lambda: nn.Conv2d(4, 40, 3, stride=2),  # more output channels than taps: multipliers up to K
}


def _sigma(layer: nn.Module) -> FullCovariance:
    d = layer.weight[0].numel()
    x = torch.randn(layer.groups, d, 3 * d, dtype=torch.float64)
    x[:, : d // 2] *= 10  # anisotropic inputs: the output norm differs from the weight norm
    return FullCovariance(x @ x.transpose(1, 2) / (3 * d))


@pytest.mark.parametrize("name", list(LAYERS))
def test_every_multiplier_equals_the_decomposed_layers_output_error(name):
    torch.manual_seed(0)
    layer = LAYERS[name]().double()
    sigma = _sigma(layer)
    method = get_method("depthwise")
    weight = grouped_weight(layer.weight, layer.groups)
    signal = sigma.quad(weight)
    errors = DepthwiseOutputErrors(layer, sigma, signal)
    full = method.full_rank(layer)
    for multiplier in [2, 1, full, full - 1]:  # out of order: levels are made once and read back
        dense = grouped_weight(method.decompose(layer, multiplier).dense_weight(), layer.groups)
        expected = output_error2(weight, dense, sigma, signal)
        assert errors(multiplier) == pytest.approx(expected, rel=1e-10, abs=1e-14)
    assert errors(full) < 1e-12  # the full multiplier is the layer itself


def test_error_function_scores_depthwise_from_one_svd(monkeypatch):
    """With a full statistic the scoring reads DepthwiseOutputErrors: one SVD for the whole grid."""
    torch.manual_seed(0)
    layer = nn.Conv2d(6, 8, 3).double()
    stats = {"conv": SimpleNamespace(covariance=_sigma(layer))}
    plan = LayerPlan("conv", layer, 0, None)
    svds = []
    original = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: svds.append(1) or original(*a, **k))
    error2 = error_function(plan, get_method("depthwise"), stats, {}, AutoOptions())
    values = [error2(m) for m in range(1, 9)]
    assert isinstance(error2, DepthwiseOutputErrors) and len(svds) == 1
    assert values == sorted(values, reverse=True)  # more filters per channel never fit worse
