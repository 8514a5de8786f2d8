"""Budget targets through convfactor.factorize: the budget holds exactly, and it is spent where it helps."""

import pytest
import torch

import convfactor
from convfactor.auto import resolve_policy
from convfactor.auto.selection.candidates import FRACTION_GRID
from convfactor.errors import PolicyError
from convfactor.policy import Policy, Rule
from tests.auto.conftest import inputs, tiny_resnet

X = inputs(2, seed=1)
AUTO_CONV = [{"types": ["Conv2d"], "method": "auto"}]
SVD_CONV = [{"types": ["Conv2d"], "method": "spatial_svd"}]


@pytest.fixture(scope="module")
def net():
    return tiny_resnet()


CASES = [(SVD_CONV, kind, f) for kind, f in [("macs", 0.5), ("macs", 0.33), ("macs", 0.25), ("params", 0.5),
                                                ("params", 0.3)]] + [(AUTO_CONV, "macs", 0.33), (AUTO_CONV, "params", 0.5)]


@pytest.mark.parametrize("rules, kind, fraction", CASES,
                         ids=[f"{'auto' if r is AUTO_CONV else 'spatial_svd'}-{k}-{f}" for r, k, f in CASES])
def test_budget_is_respected_exactly(net, rules, kind, fraction):
    out = convfactor.factorize(net, {"rules": rules, "target": {kind: fraction}}, X)
    report = convfactor.get_report(out)
    achieved = report.macs_ratio if kind == "macs" else report.params_ratio
    assert achieved <= fraction
    info = report.extra["auto"]
    assert info["selection"].startswith("weight-based selection (no calibration data)")
    if kind == "macs":
        # The allocator's prediction is the count convfactor.costs makes of the result, to the MAC.
        assert info["target"]["predicted"] == report.macs_after
        assert achieved >= 0.9 * fraction  # the budget is used, not wasted
    for decision in report.replaced:
        assert decision.macs_after < decision.macs_before and decision.params_after < decision.params_before
        chosen = info["layers"][decision.name]["chosen"]
        assert (chosen["method"], chosen["rank"]) == (decision.method, decision.rank)
        assert chosen["cost_fraction"] < 1
    if rules is SVD_CONV:
        assert {d.method for d in report.replaced} == {"spatial_svd"}
    # The resolved policy names every layer exactly, with a concrete rank.
    resolved = Policy.from_dict(report.policy["resolved"])
    assert resolved.target is None and all("*" not in r.match for r in resolved.rules)
    assert all(r.method == "skip" or isinstance(r.rank, (int, tuple)) for r in resolved.rules)


def test_options_costing_at_least_the_original_are_never_offered(net):
    report = convfactor.get_report(convfactor.factorize(net, {"rules": AUTO_CONV, "target": {"macs": 0.6}}, X))
    for layer in report.extra["auto"]["layers"].values():
        assert all(cost < 1 for _, _, cost, _ in layer["options"])
        assert layer.get("dropped", 0) > 0  # full-rank spatial SVD of a 3x3 conv costs more: dropped


def test_layers_outside_the_rules_count_at_full_cost(net):
    policy = {"rules": [{"match": "layer2.*", "types": ["Conv2d"], "method": "spatial_svd"}], "target": {"macs": 0.7}}
    report = convfactor.get_report(convfactor.factorize(net, policy, X))
    assert report.macs_ratio <= 0.7
    assert all(d.name.startswith("layer2.") for d in report.replaced)
    fixed = sum(d.macs_before for d in report.layers if not d.name.startswith("layer2.") or d.layer_type != "Conv2d")
    assert report.extra["auto"]["target"]["fixed"] == fixed
    with pytest.raises(PolicyError, match=r"target macs 0.3 is not reachable: .*layers the policy leaves alone"):
        convfactor.factorize(net, {**policy, "target": {"macs": 0.3}}, X)


def test_allocation_beats_every_uniform_rank_fraction(net):
    """A layer with a rank-2 weight costs nothing to compress: the allocator exploits it, a uniform ratio cannot."""
    model = tiny_resnet()
    conv = model.layer1[0].conv1  # 8 -> 8, 3x3: the spatial-SVD matrix is (24, 24)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        low = torch.randn(24, 2, generator=g) @ torch.randn(2, 24, generator=g)
        conv.weight.copy_(low.reshape(8, 3, 8, 3).permute(2, 0, 1, 3))
    report = convfactor.get_report(convfactor.factorize(model, {"rules": SVD_CONV, "target": {"macs": 0.5}}, X))
    info = report.extra["auto"]
    ranks = {d.name: d.rank for d in report.replaced}
    # conv1 (folded BN only rescales rows) keeps rank 2; the saving is spent on other layers.
    assert ranks["layer1.0.conv1"] == 2
    assert len({info["layers"][n]["chosen"]["cost_fraction"] for n in ranks}) > 1
    # Predicted loss of the allocation vs the same loss of every uniform fraction that fits the budget.
    allocated = info["predicted_loss"]
    options = {name: layer["options"] for name, layer in info["layers"].items() if layer.get("options")}
    fixed, total, budget = info["target"]["fixed"], info["target"]["original"], info["target"]["budget"]
    uniform_losses = []
    for fraction in FRACTION_GRID:
        cost, loss = fixed, 0.0
        for name, layer in info["layers"].items():
            original = layer.get("original", {}).get("macs", 0)
            rows = [o for o in options.get(name, []) if o[2] <= fraction + 1e-9]
            if not rows:  # the uniform fraction keeps this layer whole
                cost += original
                continue
            best = max(rows, key=lambda o: o[2])
            cost, loss = cost + best[2] * original, loss + best[3]
        if cost <= budget:
            uniform_losses.append(loss)
    assert uniform_losses and allocated < 0.9 * min(uniform_losses)
    assert total == report.macs_before


def test_skip_rules_and_linear_layers(net):
    policy = {"rules": [{"match": "conv1", "method": "skip"}, {"types": ["Conv2d", "Linear"], "method": "auto"}],
              "target": {"params": 0.4}}
    report = convfactor.get_report(convfactor.factorize(net, policy, X))
    assert report.params_ratio <= 0.4
    conv1 = next(d for d in report.layers if d.name == "conv1")
    assert conv1.status == "skipped"
    assert report.extra["auto"]["layers"]["conv1"]["reason"] == "rule 1: skip"


def test_user_mistakes_raise_one_line_policy_errors(net):
    with pytest.raises(PolicyError, match="needs example_inputs"):
        convfactor.factorize(net, {"rules": AUTO_CONV, "target": {"macs": 0.5}})
    with pytest.raises(PolicyError, match="'auto' without a target needs a rank spec"):
        convfactor.factorize(net, {"rules": AUTO_CONV}, X)
    with pytest.raises(PolicyError, match="not reachable"):
        convfactor.factorize(net, {"rules": AUTO_CONV, "target": {"macs": 0.01}}, X)


def test_vbmf_rank_spec_resolves_to_the_estimate(net):
    """``rank: vbmf`` (pending policy syntax) resolves per layer to the VBMF estimate of the method's matrix."""
    from convfactor.auto.selection.vbmf import vbmf_layer_rank

    root = net
    rule = Rule(method="spatial_svd", match="layer2.*", types=("Conv2d",), rank="vbmf")
    resolution = resolve_policy(root, Policy((rule,)), example_inputs=X)
    resolved = {r.match: r.rank for r in resolution.policy.rules if r.method == "spatial_svd"}
    assert resolved and all(rank == vbmf_layer_rank("spatial_svd", root.get_submodule(name))
                            for name, rank in resolved.items())
