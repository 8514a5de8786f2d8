"""factorize(): accepted policy forms, the report (table and JSON), full-rank fidelity on a ResNet-style net."""

import json

import pytest
import torch
from torch import nn

import convfactor
from convfactor import ConvfactorError, Policy
from tests.nets import TinyResNet, randomize_batchnorm

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
CONV_POLICY = {"rules": [{"types": ["Conv2d"], "method": "spatial_svd", "rank": 0.5}]}


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return randomize_batchnorm(TinyResNet())


@pytest.mark.parametrize("form", ["policy", "dict", "yaml", "json", "shorthand"])
def test_policy_forms_give_the_same_result(resnet, tmp_path, form):
    policy = Policy.from_dict({"rules": [{"types": ["Conv2d"], "method": "spatial_svd", "rank": 0.5,
                                          "only_if_cheaper": True}]})  # what the shorthand means
    spec = {"policy": policy, "dict": policy.to_dict(), "shorthand": "spatial_svd:0.5"}.get(form)
    if form in ("yaml", "json"):
        spec = tmp_path / f"p.{form}"
        policy.save(spec)
        spec = str(spec)
    out = convfactor.factorize(resnet, spec, X)
    reference = convfactor.factorize(resnet, policy, X)
    torch.testing.assert_close(out(X), reference(X), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["spatial_svd", "tucker2", "cp", "grouped", "depthwise"])
def test_full_rank_resnet_every_conv_replaced_output_within_1e5(resnet, method):
    out = convfactor.factorize(resnet, {"rules": [{"types": ["Conv2d"], "method": method, "rank": 1.0}]}, X)
    report = convfactor.get_report(out)
    convs = {n for n, m in resnet.named_modules() if isinstance(m, nn.Conv2d)}
    eligible = {n for n in convs
                if convfactor.get_method(method).unsupported_reason(resnet.get_submodule(n)) is None}
    assert {d.name for d in report.replaced} == eligible
    three_by_three = {n for n in convs if resnet.get_submodule(n).kernel_size == (3, 3)}
    assert three_by_three <= eligible
    for d in report.layers:
        assert (d.status == "replaced") == (d.name in eligible)
        assert d.status == "replaced" or d.reason
    with torch.no_grad():
        expected = resnet(X)
        assert float((out(X) - expected).norm() / expected.norm()) <= 1e-5


def test_report_json_and_table(resnet):
    out = convfactor.factorize(resnet, CONV_POLICY, X)
    report = convfactor.get_report(out)
    data = json.loads(report.to_json())
    assert data["totals"]["layers_replaced"] == 10
    assert data["totals"]["macs_before"] == report.macs_before > data["totals"]["macs_after"]
    assert data["plan"]["layers"]["layer1.0.conv1"] == {"method": "spatial_svd", "rank": 24}
    assert data["plan"]["fold_batchnorm"] is True
    assert len(data["layers"]) == 11
    table = report.format_table()
    assert "layer1.0.conv1" in table and "spatial_svd" in table and "MACs/sample" in table
    assert "layers replaced: 10/11" in table


def test_report_without_example_inputs_has_no_macs(resnet):
    report = convfactor.get_report(convfactor.factorize(resnet, CONV_POLICY))
    assert report.macs_before is None and all(d.macs_before is None for d in report.layers)
    assert "MACs: n/a" in report.format_table()


def test_bad_arguments():
    with pytest.raises(ConvfactorError, match="needs an nn.Module"):
        convfactor.factorize("model", "spatial_svd")
    with pytest.raises(ConvfactorError, match="no Conv1d, Conv2d or Linear"):
        convfactor.factorize(nn.Sequential(nn.ReLU()), "spatial_svd")
    with pytest.raises(ConvfactorError, match="example input 0 is a int; give tensors"):
        convfactor.factorize(nn.Conv2d(2, 2, 3), "spatial_svd", example_inputs=[1, 2])
    with pytest.raises(ConvfactorError, match="not produced by convfactor"):
        convfactor.get_report(nn.Conv2d(2, 2, 3))


def test_result_is_eval_and_float64_stays_exact():
    torch.manual_seed(0)
    model = randomize_batchnorm(TinyResNet()).double()
    x = X.double()
    out = convfactor.factorize(model, "spatial_svd", x)
    assert not out.training
    with torch.no_grad():
        expected = model(x)
        assert float((out(x) - expected).norm() / expected.norm()) <= 1e-10


def test_calibration_makes_a_plain_policy_data_aware(resnet):
    """With calibration inputs, the same ranks give a lower output error than weight-only factors."""
    calibration = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    policy = {"rules": [{"types": ["Conv2d"], "method": "spatial_svd", "rank": 0.3}]}
    weight_only = convfactor.factorize(resnet, policy, X)
    data_aware = convfactor.factorize(resnet, policy, X, calibration=calibration)
    ranks = {d.name: d.rank for d in convfactor.get_report(weight_only).replaced}
    assert {d.name: d.rank for d in convfactor.get_report(data_aware).replaced} == ranks
    with torch.no_grad():
        expected = resnet(calibration)
        error_weight = float((weight_only(calibration) - expected).norm() / expected.norm())
        error_data = float((data_aware(calibration) - expected).norm() / expected.norm())
    assert error_data < 0.8 * error_weight


def test_vbmf_rank_spec_round_trips_and_resolves(resnet):
    policy = Policy.from_any("spatial_svd:vbmf")
    assert policy.to_dict() == {"rules": [{"match": "*", "method": "spatial_svd", "rank": "vbmf"}]}
    assert policy.needs_resolution and Policy.from_yaml(policy.to_yaml()) == policy
    report = convfactor.get_report(convfactor.factorize(resnet, policy, X))
    assert report.replaced and all(isinstance(d.rank, int) and d.rank >= 1 for d in report.replaced)


@pytest.mark.parametrize("given", [torch.zeros(1), [torch.zeros(1)], (torch.zeros(1), torch.ones(2))])
def test_as_input_tuple_takes_a_tensor_or_a_sequence_of_them(given):
    from convfactor.inputs import as_input_tuple

    got = as_input_tuple(given)
    assert isinstance(got, tuple) and all(isinstance(t, torch.Tensor) for t in got)
    assert len(got) == (1 if isinstance(given, torch.Tensor) else len(given))


def test_as_input_tuple_none_only_when_allowed_and_numpy_becomes_tensor():
    import numpy as np

    from convfactor.errors import InputSpecError
    from convfactor.inputs import as_input_tuple

    assert as_input_tuple(None, allow_none=True) is None
    with pytest.raises(InputSpecError, match="example input 0 is a NoneType"):
        as_input_tuple(None)
    with pytest.raises(InputSpecError, match="no example inputs given"):
        as_input_tuple([])
    (t,) = as_input_tuple(np.arange(3, dtype=np.float32))
    assert torch.equal(t, torch.arange(3, dtype=torch.float32))
