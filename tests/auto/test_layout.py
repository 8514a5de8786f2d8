"""convfactor.auto.layout: the resolution's passes in channels-last memory where measured faster; the
caller's weights are put back; a network that cannot run that way keeps the contiguous layout."""

import pytest
import torch
from torch import nn

import convfactor
from convfactor.auto import AutoOptions
from convfactor.auto import layout as layout_module
from convfactor.auto.layout import choose_layout, conv_layout
from convfactor.errors import PolicyError


class ViewNet(nn.Module):
    """Flattens with .view after a conv: raises on a channels-last tensor."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8 * 8 * 8, 4)

    def forward(self, x):
        y = self.conv(x)
        return self.head(y.view(y.shape[0], -1))


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


def test_conv_layout_converts_inside_and_puts_the_weights_back():
    net = _net()
    net[2].weight.data = net[2].weight.data.contiguous(memory_format=torch.channels_last)  # kept as it was
    before = {name: (p, p.detach().clone(), p.stride()) for name, p in net.named_parameters()}
    with conv_layout(net, True):
        assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert not net[0].weight.is_contiguous()
        out = net(torch.randn(2, 3, 8, 8))
        assert out.shape == (2, 8)
    for name, p in net.named_parameters():
        parameter, values, stride = before[name]
        assert p is parameter and p.stride() == stride and torch.equal(p, values)
    with conv_layout(net, False):
        assert net[0].weight.is_contiguous()


def test_small_networks_and_pinned_contiguous_are_not_timed(monkeypatch):
    calls = []
    monkeypatch.setattr(layout_module, "_seconds", lambda *a: calls.append(1) or 1.0)
    sample = (torch.randn(1, 3, 8, 8),)
    assert choose_layout(_net(), sample, 1e6, "auto", False) == layout_module.Layout(False)
    assert choose_layout(_net(), sample, 1e12, "contiguous", False) == layout_module.Layout(False)
    assert choose_layout(_net(), sample, 1e12, "auto", True) == layout_module.Layout(False)  # torch timing
    assert choose_layout(_net(), None, 1e12, "auto", False) == layout_module.Layout(False)
    assert not calls


@pytest.mark.parametrize("last, contiguous, chosen", [(0.5, 1.0, True), (0.95, 1.0, False), (2.0, 1.0, False)])
def test_auto_keeps_channels_last_only_when_faster_by_the_margin(monkeypatch, last, contiguous, chosen):
    def timed(root, sample):
        return last if root[0].weight.is_contiguous(memory_format=torch.channels_last) else contiguous

    monkeypatch.setattr(layout_module, "_seconds", timed)
    result = choose_layout(_net(), (torch.randn(1, 3, 8, 8),), 1e12, "auto", False)
    assert result.channels_last is chosen
    assert result.note.startswith(f"layout: {'channels-last' if chosen else 'contiguous'}")


def test_a_network_that_cannot_run_channels_last_keeps_contiguous_or_errors_when_pinned():
    sample = (torch.randn(1, 3, 8, 8),)
    result = choose_layout(ViewNet().eval(), sample, 1e12, "auto", False)
    assert result.channels_last is False and "does not run in channels-last" in result.note
    with pytest.raises(PolicyError, match="layout='channels_last'"):
        choose_layout(ViewNet().eval(), sample, 1e12, "channels_last", False)


def test_bad_layout_option_is_rejected():
    with pytest.raises(ValueError, match="layout must be one of"):
        AutoOptions(layout="nhwc")


def test_factorize_in_either_layout_gives_the_same_allocation_and_leaves_the_model_alone():
    net = _net()
    weights = {name: p.detach().clone() for name, p in net.named_parameters()}
    calibration = torch.randn(64, 3, 12, 12)
    policy = {"target": {"macs": 0.6}, "rules": [{"match": "*", "method": "auto"}]}
    results = {}
    for layout in ("contiguous", "channels_last"):
        out = convfactor.factorize(net, policy, calibration[:1], calibration=calibration,
                                   auto_options=AutoOptions(layout=layout))
        report = convfactor.get_report(out)
        with torch.no_grad():
            results[layout] = (report.policy["resolved"], out(calibration[:8]))
        if layout == "channels_last":
            assert "layout: channels-last (auto_options)" in report.extra["auto"]["notes"]
    assert results["contiguous"][0] == results["channels_last"][0]
    a, b = results["contiguous"][1], results["channels_last"][1]
    assert float((a - b).norm() / a.norm()) < 1e-5
    for name, p in net.named_parameters():
        assert p.is_contiguous() and torch.equal(p, weights[name])


def test_a_failure_in_the_contiguous_layout_is_the_networks_own_and_propagates(monkeypatch):
    def timed(root, sample):
        if not root[0].weight.is_contiguous(memory_format=torch.channels_last):
            raise RuntimeError("the network's own error")
        return 1.0

    monkeypatch.setattr(layout_module, "_seconds", timed)
    with pytest.raises(RuntimeError, match="own error"):
        choose_layout(_net(), (torch.randn(1, 3, 8, 8),), 1e12, "auto", False)
