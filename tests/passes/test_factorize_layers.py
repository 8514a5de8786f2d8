"""factorize_layers on ResNet- and MobileNet-style nets: what is replaced, what is not and why."""

import copy

import pytest
import torch
from torch import nn

import convfactor
from convfactor.methods.base import FactorizedLayer
from tests.nets import TinyMobileNet, TinyResNet, randomize_batchnorm

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return randomize_batchnorm(TinyResNet())


@pytest.fixture(scope="module")
def mobilenet():
    torch.manual_seed(0)
    return randomize_batchnorm(TinyMobileNet())


@torch.no_grad()
def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_every_matched_conv_replaced_rest_untouched(resnet):
    policy = {"rules": [{"types": ["Conv2d"], "method": "spatial_svd"}]}
    out = convfactor.factorize(resnet, policy, X)
    report = convfactor.get_report(out)
    convs = [n for n, m in resnet.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(d.name for d in report.replaced) == sorted(convs)
    for name in convs:
        assert isinstance(out.get_submodule(name), FactorizedLayer)
    fc = next(d for d in report.layers if d.name == "fc")
    assert fc.status == "unmatched" and fc.reason == "no policy rule matches"
    assert torch.equal(out.get_submodule("fc").weight, resnet.fc.weight)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in out.modules())
    assert len(report.folded) == len(convs)
    assert _rel(out(X), resnet(X)) <= 1e-5


def test_callers_model_is_not_mutated(resnet):
    before = copy.deepcopy(resnet.state_dict())
    training = resnet.training
    convfactor.factorize(resnet, "spatial_svd:0.5", X)
    after = resnet.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert resnet.training == training
    assert all(type(m) is not FactorizedLayer for m in resnet.modules())


def test_mobilenet_skip_reasons(mobilenet):
    out = convfactor.factorize(mobilenet, "spatial_svd", X)
    report = convfactor.get_report(out)
    by_name = {d.name: d for d in report.layers}
    for name in ("dw1.0", "dw2.0"):
        assert by_name[name].status == "skipped"
        assert "already depthwise" in by_name[name].reason
    assert "Linear" in by_name["head"].reason
    assert {d.name for d in report.replaced} == {"stem.0", "pw1.0", "pw2.0", "grouped"}
    assert _rel(out(X), mobilenet(X)) <= 1e-5


def test_no_bn_folding_keeps_batchnorm(resnet):
    out = convfactor.factorize(resnet, "spatial_svd", X, fold_batchnorm=False)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in out.modules()) == sum(
        isinstance(m, nn.BatchNorm2d) for m in resnet.modules())
    assert not convfactor.get_report(out).folded
    assert _rel(out(X), resnet(X)) <= 1e-5


def test_skip_rule_and_reasons_in_report(resnet):
    policy = {"rules": [{"match": "conv1", "method": "skip"}, {"match": "*", "types": ["Conv2d"],
                                                                "method": "spatial_svd", "rank": 0.25}]}
    report = convfactor.get_report(convfactor.factorize(resnet, policy, X))
    conv1 = next(d for d in report.layers if d.name == "conv1")
    assert conv1.status == "skipped" and conv1.reason == "rule 1: skip" and conv1.rule == 1
    replaced = report.replaced
    assert all(d.rule == 2 and d.method == "spatial_svd" for d in replaced)
    assert all(0 < d.weight_error < 1 for d in replaced)
    assert report.macs_after < report.macs_before
    assert sum(d.macs_before for d in report.layers) == report.macs_before


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.b.weight = self.a.weight
        self.c = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.c(self.b(self.a(x))) + nn.functional.conv2d(x, self.c.weight, padding=1)


def test_tied_and_directly_read_weights_are_skipped():
    model = Tied().eval()
    x = torch.randn(1, 4, 6, 6)
    out = convfactor.factorize(model, "spatial_svd", x)
    by_name = {d.name: d for d in convfactor.get_report(out).layers}
    assert "tied weights" in by_name["a"].reason and "tied weights" in by_name["b"].reason
    assert "get_attr" in by_name["c"].reason
    torch.testing.assert_close(out(x), model(x))


def test_conv1d_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 8, 5, stride=2, padding=2), nn.BatchNorm1d(8), nn.ReLU(),
                          nn.Conv1d(8, 8, 3, dilation=2, padding="same")).eval()
    randomize_batchnorm(model)
    x = torch.randn(2, 3, 40)
    out = convfactor.factorize(model, "tucker2", x)
    assert len(convfactor.get_report(out).replaced) == 2
    assert _rel(out(x), model(x)) <= 1e-5
