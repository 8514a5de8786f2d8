"""The course's other methods through a policy: `method: NAME` rules, data-aware refit, opt-in for `auto`."""

from __future__ import annotations

import pytest
import torch

import convfactor
from convfactor.auto import AutoOptions, resolve_policy
from convfactor.auto.selection.plans import auto_methods
from convfactor.methods import get_method
from tests.auto.conftest import inputs, tiny_resnet

COURSE_METHODS = [m for m in ("channel_svd", "shift", "dictionary", "sal") if m in convfactor.available_methods()]


def _output_error(reference: torch.nn.Module, candidate: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        want = reference(x)
        return float((candidate(x) - want).norm() / want.norm())


@pytest.mark.parametrize("method_name", COURSE_METHODS)
def test_a_method_rule_replaces_the_layers_it_can(method_name: str) -> None:
    model = tiny_resnet(width=8)
    x = inputs(2, seed=0)
    policy = {"rules": [{"match": "conv1", "method": "skip"},
                        {"types": ["Conv2d"], "method": method_name, "rank": 1.0}]}
    fast = convfactor.factorize(model, policy, x)
    report = convfactor.get_report(fast)
    replaced = report.replaced
    assert replaced and all(d.method == method_name for d in replaced)
    module_cls = get_method(method_name).module_cls
    assert sum(isinstance(m, module_cls) for m in fast.modules()) == len(replaced)
    assert _output_error(model, fast, inputs(4, seed=1)) <= 1e-5  # full rank: float32 exact


@pytest.mark.parametrize("method_name", COURSE_METHODS)
def test_calibration_data_lowers_the_output_error(method_name: str) -> None:
    model = tiny_resnet(width=8)
    x, calibration, heldout = inputs(2, seed=0), inputs(64, seed=2), inputs(32, seed=3)
    policy = {"rules": [{"match": "conv1", "method": "skip"},
                        {"types": ["Conv2d"], "method": method_name, "rank": 0.25}]}
    weight_only = convfactor.factorize(model, policy, x)
    data_aware = convfactor.factorize(model, policy, x, calibration=calibration)
    assert _output_error(model, data_aware, heldout) < _output_error(model, weight_only, heldout)


def test_course_methods_are_opt_in_for_auto() -> None:
    assert not set(COURSE_METHODS) & set(auto_methods(AutoOptions()))
    model = tiny_resnet(width=8)
    x = inputs(2, seed=0)
    policy = {"rules": [{"match": "conv1", "method": "skip"}, {"types": ["Conv2d"], "method": "auto"}],
              "target": {"params": 0.7}}
    resolution = resolve_policy(model, policy, example_inputs=x,
                                options=AutoOptions(auto_methods=("channel_svd",), sensitivity=False))
    chosen = {rule.method for rule in resolution.policy.rules} - {"skip"}
    assert chosen == {"channel_svd"}


@pytest.mark.parametrize("method_name", COURSE_METHODS)
def test_save_and_load_reproduce_the_factorized_model(tmp_path, method_name: str) -> None:
    model = tiny_resnet(width=8)
    x = inputs(2, seed=0)
    fast = convfactor.factorize(model, {"rules": [{"types": ["Conv2d"], "method": method_name, "rank": 0.5}]}, x)
    path = tmp_path / "fast.pt"
    convfactor.save_factorized(fast, path, arch={"factory": "tests.nets:TinyResNet", "kwargs": {"width": 8}})
    reloaded = convfactor.load(path, trust_code=True)  # the test's own factory
    with torch.no_grad():
        assert torch.equal(reloaded(x), fast(x))
