"""Candidate options: rank grids that survive re-resolution, exact costs, closed-form weight errors."""

import pytest
import torch
from torch import nn

from convfactor.auto.selection.candidates import WeightErrors, rank_grid, rank_to_json
from convfactor.costs import count_params, per_layer_macs, replacement_costs
from convfactor.decisions import weight_error
from convfactor.methods import available_methods, get_method

LAYERS = {
    "conv3x3": (lambda: nn.Conv2d(16, 24, 3, 1, 1), (1, 16, 9, 9)),
    "strided_reflect": (lambda: nn.Conv2d(8, 16, 3, 2, 1, padding_mode="reflect"), (1, 8, 11, 11)),
    "grouped_asym": (lambda: nn.Conv2d(16, 16, (3, 2), (2, 1), (1, 0), groups=4), (1, 16, 10, 9)),
    "same_dilated": (lambda: nn.Conv2d(8, 12, 3, 1, "same", dilation=2), (1, 8, 9, 9)),
    "pointwise": (lambda: nn.Conv2d(16, 8, 1), (1, 16, 6, 6)),
    "conv1d": (lambda: nn.Conv1d(6, 10, 5, 2, 2), (1, 6, 20)),
    "linear": (lambda: nn.Linear(24, 12), (1, 24)),
}
FAST = [m for m in available_methods() if m != "cp"]


def make(case):
    factory, shape = LAYERS[case]
    torch.manual_seed(0)
    return factory().double(), shape


@pytest.mark.parametrize("case", LAYERS)
@pytest.mark.parametrize("method_name", FAST)
def test_costs_match_the_decomposed_module(case, method_name):
    layer, shape = make(case)
    method = get_method(method_name)
    if method.unsupported_reason(layer):
        pytest.skip("method does not apply")
    for rank in rank_grid(method, layer, (1 / 8, 1 / 2, 1.0)):
        module = method.decompose(layer, rank)
        x = torch.zeros(shape, dtype=torch.float64)
        assert replacement_costs(method, layer, rank, shape) == (sum(per_layer_macs(module, (x,)).values()),
                                                                   count_params(module))
        assert replacement_costs(method, layer, rank, None) == (None, count_params(module))


@pytest.mark.parametrize("case", LAYERS)
@pytest.mark.parametrize("method_name", FAST)
def test_grid_ranks_resolve_to_themselves_and_respect_align(case, method_name):
    layer, _ = make(case)
    method = get_method(method_name)
    if method.unsupported_reason(layer):
        pytest.skip("method does not apply")
    grid = rank_grid(method, layer)
    assert grid and len(grid) == len(set(grid))
    for rank in grid:
        assert method.resolve_rank(layer, rank=rank_to_json(rank)) == rank
    if method_name in ("spatial_svd", "svd", "tucker2"):
        full = method.full_rank(layer)
        fulls = full if isinstance(full, tuple) else (full,)
        for rank in rank_grid(method, layer, align=8):
            parts = rank if isinstance(rank, tuple) else (rank,)
            assert all(r % 8 == 0 or r == f for r, f in zip(parts, fulls))


@pytest.mark.parametrize("case", LAYERS)
@pytest.mark.parametrize("method_name", ["spatial_svd", "svd", "depthwise", "tucker2"])
def test_closed_form_weight_errors_equal_decomposition(case, method_name):
    layer, _ = make(case)
    method = get_method(method_name)
    if method.unsupported_reason(layer):
        pytest.skip("method does not apply")
    errors = WeightErrors(method, layer)
    assert errors._tail is not None or errors._core_energy is not None  # the closed form is used
    for rank in rank_grid(method, layer):
        expected = weight_error(layer, method.decompose(layer, rank)) ** 2
        assert errors(rank) == pytest.approx(expected, abs=1e-10)
    assert errors(method.full_rank(layer)) <= 1e-20


def test_vbmf_rank_joins_the_grid():
    layer, _ = make("conv3x3")
    method = get_method("spatial_svd")
    assert 7 in rank_grid(method, layer, (0.5,), extra_ranks=[7])
    assert rank_grid(method, layer, (0.5,), align=8, extra_ranks=[7]) == [24, 8]


def test_methods_of_one_layer_share_its_output_signal(monkeypatch):
    """E||W p||^2 is computed once per layer and read by every method's error function, with the same errors."""
    from types import SimpleNamespace

    from convfactor.auto.options import AutoOptions
    from convfactor.auto.selection.plans import LayerPlan
    from convfactor.auto.selection.scoring import error_function
    from convfactor.auto.statistics.covariance import FullCovariance

    torch.manual_seed(0)
    layer = nn.Conv2d(6, 8, 3)
    x = torch.randn(1, 54, 200, dtype=torch.float64)
    sigma = FullCovariance(x @ x.transpose(1, 2) / 200)
    stats = {"conv": SimpleNamespace(covariance=sigma)}
    plan = LayerPlan("conv", layer, 0, None)
    weight = layer.weight.detach().double().reshape(1, 8, -1)
    quads = []
    original = FullCovariance.quad

    def counted(self, w):
        quads.append(torch.equal(w, weight))
        return original(self, w)

    monkeypatch.setattr(FullCovariance, "quad", counted)
    methods = ["spatial_svd", "tucker2", "depthwise", "svd"]
    ranks = {"spatial_svd": 3, "tucker2": (3, 4), "depthwise": 2, "svd": 4}
    signals = {}
    shared = {m: error_function(plan, get_method(m), stats, {}, AutoOptions(), signals)(ranks[m]) for m in methods}
    assert sum(quads) == 1 and list(signals) == ["conv"]
    quads.clear()
    alone = {m: error_function(plan, get_method(m), stats, {}, AutoOptions())(ranks[m]) for m in methods}
    assert sum(quads) == len(methods)
    assert shared == pytest.approx(alone, rel=1e-12)
