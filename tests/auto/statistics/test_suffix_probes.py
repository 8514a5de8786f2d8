"""Suffix probes (the graph after the probed layer, from the values live across it) equal whole-network probes.

The whole-network path runs the untraced module (a forward hook swaps the probe in, every batch, every
probe); the suffix path runs the traced GraphModule, which shares its layers. Both add the same per-batch
sums in the same order, so the results agree to float64 rounding of identical float32 tensors: asserted
with rel 1e-9 (exact in practice), and within rel 1e-6 where a chunked run may differ in nothing but order.
"""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from convfactor.auto.statistics import sensitivity
from convfactor.auto.statistics.calibration import layer_sensitivities
from convfactor.auto.statistics.suffix import GraphRunner, probe_nodes
from tests.auto.conftest import inputs, tiny_resnet

REL = 1e-9


class _InPlaceResNet(nn.Module):
    """In-place ops on values computed before a probed layer: the skip added with ``add_`` after the 1x1
    downsample (fx traces ``+=`` as an out-of-place add), ReLU(inplace=True)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(8, 16, 3, 2, 1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 1, 2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.relu(self.stem(x))
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        identity = self.down(x)
        out.add_(identity)
        out = self.relu(out)
        return self.fc(out.mean(dim=(2, 3)))


class _Branches(nn.Module):
    """Two outputs, a layer inside one branch only, a shared conv called twice, a layer used in a view."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.left = nn.Conv2d(8, 8, 3, padding=1)
        self.right = nn.Conv2d(8, 8, 1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        left = torch.relu(self.left(h))
        right = self.right(h)
        both = self.shared(left) + self.shared(right)
        flat = both.mean(dim=(2, 3))
        flat.relu_()
        return {"scores": self.head(flat), "map": both[:, :4]}


def _probes(layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Each layer with its weight perturbed (a stand-in for a factorized layer)."""
    out = {}
    for name, layer in layers.items():
        probe = type(layer)(**_args(layer))
        probe.load_state_dict(layer.state_dict())
        with torch.no_grad():
            probe.weight.add_(0.1 * torch.randn(probe.weight.shape, generator=torch.Generator().manual_seed(7)))
        out[name] = probe.eval()
    return out


def _args(layer: nn.Module) -> dict:
    if isinstance(layer, nn.Linear):
        return {"in_features": layer.in_features, "out_features": layer.out_features}
    return {"in_channels": layer.in_channels, "out_channels": layer.out_channels, "kernel_size": layer.kernel_size,
            "stride": layer.stride, "padding": layer.padding, "groups": layer.groups, "bias": layer.bias is not None}


def _layers(net: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _batches(count: int, size: int = 16) -> list[tuple[torch.Tensor]]:
    return [(inputs(3, seed, size),) for seed in range(count)]


def _case(net: nn.Module, count: int) -> tuple[fx.GraphModule, dict, dict, list]:
    """``net`` traced, its layers, a perturbed probe for each, and ``count`` batches."""
    layers = _layers(net)
    return fx.symbolic_trace(net), layers, _probes(layers), _batches(count)


def _assert_same(got: dict, want: dict, rel: float = REL) -> None:
    assert list(got) == list(want)
    for name in want:
        for key in ("layer_error2", "output_error2", "sensitivity"):
            assert got[name][key] == pytest.approx(want[name][key], rel=rel, abs=1e-300), (name, key)
        assert want[name]["sensitivity"] > 0, name  # the comparison is not between zeros


@pytest.mark.parametrize("make", [lambda: tiny_resnet(seed=1), _InPlaceResNet, _Branches],
                         ids=["resnet_skips", "inplace_downsample", "branches_shared_two_outputs"])
def test_suffix_probes_equal_whole_network(make):
    torch.manual_seed(0)
    net = make().eval()
    traced, layers, probes, batches = _case(net, 3)
    whole = layer_sensitivities(net, layers, probes, batches)
    assert not probe_nodes(net, layers)  # an untraced module: the whole-network path
    got = layer_sensitivities(traced, layers, probes, batches)
    _assert_same(got, whole)
    # The network is left as it was: its outputs are unchanged by the probing.
    for batch in batches:
        torch.testing.assert_close(traced(*batch), net(*batch), rtol=0, atol=0)


def test_shared_layer_falls_back_to_whole_network():
    net = _Branches().eval()
    traced = fx.symbolic_trace(net)
    layers = _layers(net)
    nodes = probe_nodes(traced, layers)
    assert "shared" not in nodes and {"a", "left", "right", "head"} <= set(nodes)
    probes = _probes({"shared": layers["shared"]})
    batches = _batches(2)
    got = layer_sensitivities(traced, layers, probes, batches)
    _assert_same(got, layer_sensitivities(net, layers, probes, batches))


def test_layer_inside_a_leaf_module_falls_back():
    net = tiny_resnet(seed=2)

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return qualname == "layer1.0" or super().is_leaf_module(m, qualname)

    traced = fx.GraphModule(net, Tracer().trace(net))
    layers = _layers(net)
    nodes = probe_nodes(traced, layers)
    assert "layer1.0.conv1" not in nodes and "layer1.1.conv1" in nodes
    probes = _probes(layers)
    batches = _batches(2)
    _assert_same(layer_sensitivities(traced, layers, probes, batches), layer_sensitivities(net, layers, probes, batches))


def test_chunked_frontiers_give_the_same_results(monkeypatch):
    net = _InPlaceResNet().eval()
    traced, layers, probes, batches = _case(net, 4)
    whole = layer_sensitivities(traced, layers, probes, batches)
    chunks = []
    original = sensitivity._chunks
    monkeypatch.setattr(sensitivity, "_chunks", lambda *a: chunks.append(original(*a)) or chunks[-1])
    monkeypatch.setattr(sensitivity, "FRONTIER_BYTES", 1)  # one batch per chunk
    _assert_same(layer_sensitivities(traced, layers, probes, batches), whole)
    assert chunks == [[[0], [1], [2], [3]]]


def test_stop_leaves_out_layers_not_probed_on_every_batch(monkeypatch):
    net = tiny_resnet(seed=3)
    traced, layers, probes, batches = _case(net, 2)
    whole = layer_sensitivities(traced, layers, probes, batches)
    asked = []
    got = layer_sensitivities(traced, layers, probes, batches, stop=lambda: asked.append(1) or len(asked) > 3)
    assert list(got) == list(whole)[:3]  # the probes' order is the graph's here
    _assert_same(got, {name: whole[name] for name in got})
    # Two chunks (one batch each), stopped in the second after its first probe: that layer alone has seen
    # every batch.
    monkeypatch.setattr(sensitivity, "FRONTIER_BYTES", 1)
    asked.clear()
    got = layer_sensitivities(traced, layers, probes, batches, stop=lambda: asked.append(1) or len(asked) > len(probes) + 1)
    assert list(got) == ["conv1"]
    _assert_same(got, {"conv1": whole["conv1"]})


def test_a_batch_over_the_probe_limit_is_probed_in_pieces(monkeypatch):
    net = _InPlaceResNet().eval()
    traced, layers, probes, batches = _case(net, 2)
    whole = layer_sensitivities(net, layers, probes, batches)
    runs = []
    suffix = GraphRunner.suffix
    monkeypatch.setattr(GraphRunner, "suffix", lambda self, run, node, value: runs.append(
        len(next(iter(run.env.values())))) or suffix(self, run, node, value))
    monkeypatch.setattr(sensitivity, "BATCH_FRONTIER_BYTES", 1)  # every sample its own piece
    # The pieces' outputs are the original's on one sample, not on the batch: equal to float32 rounding.
    _assert_same(layer_sensitivities(traced, layers, probes, batches), whole, rel=1e-4)
    assert runs and set(runs) == {1} and len(runs) == len(probes) * sum(len(b[0]) for b in batches)


def test_frontier_holds_only_live_values():
    net = tiny_resnet(seed=4)
    traced = fx.symbolic_trace(net)
    runner = GraphRunner(traced)
    (x,) = _batches(1, size=32)[0]
    run = runner.start((x,))
    node = probe_nodes(traced, _layers(net))["layer1.1.conv1"]
    runner.advance(run, runner.index[node])
    # Before a block's first conv only the block input is live (read by the conv and the skip).
    assert [n.name for n in run.env] == [node.args[0].name]
    assert runner.inspect((x,), 0, len(runner.nodes)) > 0
    assert not runner.copies  # TinyResNet changes nothing in place: the suffix reads the frontier as it is
    inplace = GraphRunner(fx.symbolic_trace(_InPlaceResNet().eval()))
    inplace.inspect((x,), 0, len(inplace.nodes))
    assert inplace.copies
    # What a suffix copies: only values a node after the probed one changes in place. The ReLUs change the
    # values made just before them; ``add_`` changes conv2's output, live across the probe at ``down``.
    copied = {}
    for name in ("conv1", "down"):
        node = next(n for n in inplace.nodes if n.name == name)
        run = inplace.start((x,))
        inplace.advance(run, inplace.index[node])
        copied[name] = {n.name for n in run.env if inplace.mutated.get(n, -1) > inplace.index[node]}
    assert copied == {"conv1": set(), "down": {"conv2"}}
