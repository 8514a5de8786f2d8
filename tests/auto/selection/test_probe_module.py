"""Sensitivity probes of weight-only candidates: a large grouped layer is probed with the weight it was scored by."""

import torch
from torch import nn

from convfactor.auto.selection.candidates import GROUPED_EXACT_WEIGHTS, Option, WeightErrors
from convfactor.auto.selection.plans import plan_layers
from convfactor.auto.selection.scoring import probe_module
from convfactor.methods import get_method
from convfactor.methods.base import FactorizedLayer
from convfactor.policy import Policy


def _plan(channels):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=True))
    return plan_layers(net, Policy.from_any({"rules": [{"method": "grouped"}]}), None)[0]


def test_a_large_grouped_layer_is_probed_with_its_index_order_grouping_as_a_dense_copy():
    plan = _plan(128)
    assert plan.layer.weight.numel() > GROUPED_EXACT_WEIGHTS
    rank = (4, 64, 64)
    probe = probe_module(plan, Option("grouped", rank, None, 0))
    assert type(probe) is nn.Conv2d and probe is not plan.layer and torch.equal(probe.bias, plan.layer.bias)
    # its relative weight error is the one the layer was scored by (the bound's), not a refined grouping's
    weight, original = probe.weight.detach(), plan.layer.weight.detach()
    error2 = float((weight - original).pow(2).sum() / original.pow(2).sum())
    scored = WeightErrors(get_method("grouped"), plan.layer)(rank)
    assert abs(error2 - scored) <= 1e-5 * scored
    refined = get_method("grouped").decompose(plan.layer, rank).dense_weight()
    assert float((refined.detach() - original).pow(2).sum() / original.pow(2).sum()) < error2
    x = torch.randn(2, 128, 6, 6)
    with torch.no_grad():
        expected = nn.functional.conv2d(x, weight, plan.layer.bias, padding=1)
        torch.testing.assert_close(probe(x), expected)


def test_a_small_grouped_layer_is_probed_with_its_decomposition():
    plan = _plan(32)
    assert plan.layer.weight.numel() <= GROUPED_EXACT_WEIGHTS
    probe = probe_module(plan, Option("grouped", (4, 16, 16), None, 0))
    assert isinstance(probe, FactorizedLayer)
