"""Under a MACs target the whole network is timed once: a result slower than the original is said so."""

from __future__ import annotations

import pytest
import torch

from convfactor.auto import AutoOptions, LatencyModel, resolve_policy
from convfactor.auto.selection.slow_forms import check_whole_model
from tests.auto.conftest import inputs, tiny_resnet

X = inputs(1, seed=3)
POLICY = {"rules": [{"types": ["Conv2d"], "method": "spatial_svd"}], "target": {"macs": 0.5}}


def stub_model(tmp_path, speedup):
    """Every replacement twice as fast alone as its layer; the whole network runs at ``speedup``."""
    compared = []

    def timer(modules, input_shape, options):
        return [1.0 if isinstance(m, torch.nn.Conv2d) else 0.5 for m in modules]

    def comparer(original, candidate, example_inputs, options):
        compared.append(candidate)
        return speedup

    return LatencyModel({"cache": tmp_path / "latency.json"}, timer=timer, comparer=comparer), compared


@pytest.mark.parametrize("speedup, warned", [(0.65, True), (1.0, True), (1.4, False)])
def test_a_network_not_faster_as_a_whole_is_said_so(tmp_path, speedup, warned):
    model, compared = stub_model(tmp_path, speedup)
    net = tiny_resnet(seed=1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    resolution = resolve_policy(net, POLICY, example_inputs=X, latency_model=model,
                                options=AutoOptions(auto_methods=("spatial_svd",)))
    account = resolution.info["speed_check"]
    assert account["slower"] == []  # every replacement alone is faster ...
    assert account["whole_model"]["speedup"] == pytest.approx(speedup)  # ... the network timed once
    assert len(compared) == 1
    replaced = [n for n, layer in resolution.info["layers"].items() if layer.get("chosen")]
    assert replaced and all(type(compared[0].get_submodule(n)) is not torch.nn.Conv2d for n in replaced)
    # ... with the weights the caller gets (weights change the time: denormals), not random ones
    assert account["whole_model"]["weights"] == "the result's"
    for name in replaced:
        timed, returned = compared[0].get_submodule(name).state_dict(), resolution.prebuilt[name].state_dict()
        assert timed.keys() == returned.keys() and all(torch.equal(timed[k], returned[k]) for k in timed)
    said = [w for w in resolution.info["speed_warnings"] if "as a whole" in w]
    assert bool(said) == warned
    if warned:
        assert f"{speedup:.2f}x" in said[0] and ("slower" in said[0]) == (speedup < 0.995)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the caller's model unchanged


def test_large_networks_are_not_timed_whole(tmp_path):
    model, compared = stub_model(tmp_path, 0.5)
    net = tiny_resnet(seed=1)
    resolution = resolve_policy(net, POLICY, example_inputs=X, latency_model=model,
                                options=AutoOptions(auto_methods=("spatial_svd",), speed_check=False))
    plans_seen = []

    class Plan:  # the few fields check_whole_model reads
        def __init__(self, name, chosen, macs):
            self.name, self.chosen, self.layer = name, chosen, net.get_submodule(name)
            self.original = type("Original", (), {"macs": macs})()
            plans_seen.append(self)

    for name, layer in resolution.info["layers"].items():
        Plan(name, None, layer.get("original", {}).get("macs", 0))
    plans_seen[0].chosen = object()
    warnings: list[str] = []
    out = check_whole_model(net, plans_seen, model, (X,), warnings, max_macs=1.0)
    assert "was not timed" in out["skipped"] and compared == [] and warnings == []


def test_a_rank_off_the_channel_blocks_gives_way_to_a_blocked_one_that_runs_faster(tmp_path):
    def off_blocks(module):
        return any(isinstance(m, torch.nn.Conv2d) and m.out_channels % 8 for m in module.modules())

    def timer(modules, input_shape, options):  # replacements beat the layer; blocked ones by far
        return [2.0 if isinstance(m, torch.nn.Conv2d) else 1.0 if off_blocks(m) else 0.3 for m in modules]

    model = LatencyModel({"cache": tmp_path / "latency.json"}, timer=timer,
                         comparer=lambda original, candidate, example_inputs, options: 1.5)
    net = tiny_resnet(seed=1, width=16)
    policy = {"rules": [{"types": ["Conv2d"], "method": "spatial_svd"}], "target": {"macs": 0.5}}
    blind = resolve_policy(net, policy, example_inputs=X, latency_model=model,
                           options=AutoOptions(auto_methods=("spatial_svd",), speed_check=False))
    off = [n for n, layer in blind.info["layers"].items() if layer.get("chosen") and layer["chosen"]["rank"] % 8]
    assert off  # the allocation alone picks ranks off the blocks
    checked = resolve_policy(net, policy, example_inputs=X, latency_model=model,
                             options=AutoOptions(auto_methods=("spatial_svd",)))
    swaps = {s["layer"]: s for s in checked.info["speed_check"]["swapped"]}
    assert swaps and set(swaps) <= set(off)
    for name in swaps:
        chosen = checked.info["layers"][name]["chosen"]
        assert chosen["rank"] % 8 == 0 and "off onnxruntime's channel blocks" in checked.info["layers"][name]["why"]
        assert chosen["macs"] <= blind.info["layers"][name]["chosen"]["macs"]  # never costs more
    total = sum(layer["chosen"]["macs"] if layer.get("chosen") else layer.get("original", {}).get("macs", 0)
                for layer in checked.info["layers"].values())
    assert total <= checked.info["target"]["budget"]


def test_denormal_weights_are_set_to_zero_and_nothing_else_changes():
    from convfactor.auto.selection.slow_forms import flush_denormals

    layer = torch.nn.Conv2d(4, 4, 1)
    tiny = torch.finfo(torch.float32).tiny
    with torch.no_grad():
        layer.weight[0, 0] = tiny / 4  # denormal
        layer.weight[1, 1] = -tiny / 1024  # denormal
        layer.weight[2, 2] = tiny  # the smallest normal: kept
        layer.bias[0] = tiny / 2
    before = layer.weight.detach().clone()
    assert flush_denormals(layer) == 3
    assert layer.weight[0, 0].item() == 0.0 and layer.weight[1, 1].item() == 0.0 and layer.bias[0].item() == 0.0
    kept = torch.ones_like(before, dtype=torch.bool)
    kept[0, 0] = kept[1, 1] = False
    assert torch.equal(layer.weight[kept], before[kept])
    assert flush_denormals(layer) == 0
