"""A layer's input read from one run per sample advanced through the graph equals the input of a prefix run,
and the sequential refit built from either is the same, with fewer network passes from the frontier."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import fx, nn

import convfactor
from convfactor.auto import AutoOptions
from convfactor.auto.search.refit import Replacements
from convfactor.auto.statistics.paired import FrontierInputs, PrefixInputs

NAMES = ["conv1", "conv2", "conv3", "conv4"]


class SkipNet(nn.Module):
    """Skip connections and in-place ReLUs: values live across several layers, changed in place after."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv4 = nn.Conv2d(16, 8, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        a = self.relu(self.conv1(x))
        b = self.relu(self.conv2(a))
        c = self.relu(self.conv3(b + a))
        return self.conv4(c + a).mean((2, 3))


def batches(count: int = 3, size: int = 4, seed: int = 0) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 12, 12, generator=g),) for _ in range(count)]


@pytest.fixture
def traced():
    torch.manual_seed(0)
    return fx.symbolic_trace(SkipNet().eval())


def test_frontier_inputs_equal_prefix_inputs_with_layers_swapped_between_requests(traced):
    data = batches()
    frontier_net, prefix_net = copy.deepcopy(traced), copy.deepcopy(traced)
    assert FrontierInputs.usable(frontier_net, NAMES)
    frontier, prefix = FrontierInputs(frontier_net, NAMES, data), PrefixInputs(prefix_net)
    for step, name in enumerate(NAMES):
        for index, batch in enumerate(data):
            got, want = frontier(name, index, batch), prefix(name, index, batch)
            assert torch.equal(got, want), (name, index)
        # Swap the layer in both networks, as the refit does: later inputs must see the new module.
        for net in (frontier_net, prefix_net):
            layer = net.get_submodule(name)
            replaced = copy.deepcopy(layer)
            with torch.no_grad():
                replaced.weight.mul_(0.5 + 0.1 * step)
            net.add_submodule(name, replaced)
    with pytest.raises(ValueError, match="only moves forward"):
        frontier("conv1", 0, data[0])


def test_frontier_needs_a_traced_network_calling_each_layer_once_in_order(traced):
    assert not FrontierInputs.usable(SkipNet(), NAMES)
    assert not FrontierInputs.usable(traced, list(reversed(NAMES)))


def _count_refit_conv_calls(monkeypatch) -> dict:
    """ReLU calls made inside ``Replacements.build``, the builds, and the refit batches."""
    counts = {"calls": 0, "builds": 0, "batches": 0, "inside": False}
    forward, build = nn.ReLU.forward, Replacements.build

    def counted(self, x):
        counts["calls"] += counts["inside"]
        return forward(self, x)

    def counted_build(self, progress=False):
        counts["inside"] = True
        try:
            return build(self, progress)
        finally:
            counts["inside"] = False
            counts["builds"] += 1
            counts["batches"] = len(self.batches)

    monkeypatch.setattr(nn.ReLU, "forward", counted)
    monkeypatch.setattr(Replacements, "build", counted_build)
    return counts


def _factorize(net: nn.Module, data) -> nn.Module:
    policy = {"rules": [{"types": ["Conv2d"], "method": "tucker2"}], "target": {"macs": 0.5}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convfactor.factorize(net, policy, data[0][0][:1], calibration=torch.cat([b[0] for b in data]),
                                    auto_options=AutoOptions(speed_check=False))


class DeepNet(nn.Module):
    """Eight 3x3 convs with skips, each followed by the one ReLU module (an fx leaf: its calls count the layers
    a pass goes through, whatever replaced the convs)."""

    def __init__(self, depth: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(depth - 1))
        self.act = nn.ReLU()

    def forward(self, x):
        x = self.act(self.stem(x))
        for conv in self.body:
            x = x + self.act(conv(x))
        return x.mean((2, 3))


def test_sequential_refit_from_frontiers_equals_refit_from_prefix_runs_with_fewer_passes(monkeypatch):
    torch.manual_seed(0)
    net = DeepNet().eval()
    data = batches(count=4, size=8, seed=1)
    used = []
    frontier_fits = Replacements._frontier_fits

    def record(self):
        used.append(frontier_fits(self))
        return used[-1]

    monkeypatch.setattr(Replacements, "_frontier_fits", record)
    counts = _count_refit_conv_calls(monkeypatch)
    by_frontier = _factorize(net, data)
    frontier = dict(counts)
    assert used and all(used), "the frontier path was not taken"

    monkeypatch.setattr(Replacements, "_frontier_fits", lambda self: False)
    counts.update(calls=0, builds=0)
    by_prefix = _factorize(net, data)

    a, b = by_frontier.state_dict(), by_prefix.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert convfactor.get_report(by_frontier).macs_ratio == convfactor.get_report(by_prefix).macs_ratio
    # Per build and batch, prefix runs pass 0 + 1 + ... + 7 layers before the eight refit layers; the
    # frontiers pass the 7 before the last one in each network. Both read the layer order in one pass (8),
    # and the frontier inspects one sample (8), the prefix runs read the original's inputs (8 per batch).
    assert counts["builds"] == frontier["builds"] >= 1 and counts["batches"] == frontier["batches"] >= 1
    per_build = frontier["builds"] * frontier["batches"]
    assert frontier["calls"] <= 2 * 7 * per_build + 16
    assert counts["calls"] >= 28 * per_build + 8
