"""The uniform baseline's bisection reads planned MACs, equal to the MACs of the model factorize builds."""

from __future__ import annotations

import warnings

import pytest
import torch

import convfactor
from convfactor.sweeps import uniform
from convfactor.sweeps.uniform import UniformPlanner, uniform_model, uniform_policy


@pytest.mark.parametrize("method", ["spatial_svd", "tucker2", "svd"])
def test_planned_macs_equal_the_built_models(net, method):
    x = torch.randn(1, 3, 8, 8)
    planner = UniformPlanner(net, (x,), {})
    for rank in (0.1, 0.3, 0.5, 0.8, 1.0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = convfactor.get_report(convfactor.factorize(net, uniform_policy(method, rank), x))
        assert planner.macs_fraction(method, rank) == pytest.approx(report.macs_after / report.macs_before,
                                                                     rel=1e-12), rank


def test_a_whole_fraction_is_not_read_as_an_absolute_rank():
    assert convfactor.Policy.from_any(uniform_policy("svd", 1.0)).rules[0].rank == 1.0
    assert isinstance(convfactor.Policy.from_any(uniform_policy("svd", 1.0)).rules[0].rank, float)


def test_only_the_chosen_fraction_is_factorized(net, monkeypatch):
    x = torch.randn(1, 3, 8, 8)
    calls = []
    factorize = uniform.factorize
    monkeypatch.setattr(uniform, "factorize", lambda *a, **k: calls.append(a[1]) or factorize(*a, **k))
    fast, rank = uniform_model(net, "spatial_svd", 0.5, (x,), {})
    report = convfactor.get_report(fast)
    assert calls == [uniform_policy("spatial_svd", rank)]
    assert report.macs_after / report.macs_before <= 0.5
    # The largest fraction within the point: a step of the bisection's resolution up costs more.
    assert UniformPlanner(net, (x,), {}).macs_fraction("spatial_svd", rank + 1 / 64) > 0.5
