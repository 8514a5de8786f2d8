"""Per-kernel shift attention (convfactor/methods/sal.py): m taps kept per kernel slice, zeros elsewhere,
the data-aware refit, and the zeros the challenge score counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convfactor
from convfactor.auto.fits.registry import layer_factorizer
from convfactor.auto.statistics.calibration import layer_statistics
from convfactor.errors import RankError
from convfactor.methods import get_method
from convfactor.methods.sal import SALConv, sal_weight
from convfactor.score import challenge_score
from tests.auto.conftest import inputs, tiny_resnet

from .conftest import LayerCase, factorize, near_subspace, relative_error

SAL = get_method("sal")


@pytest.mark.parametrize(("layer", "reason"), [
    (nn.Conv2d(4, 8, 1), "one tap per kernel"),
    (nn.Linear(4, 8), "not Linear"),
])
def test_rejects_with_a_reason(layer: nn.Module, reason: str) -> None:
    assert reason in SAL.unsupported_reason(layer)
    with pytest.raises(RankError, match="^sal cannot represent this layer"):
        SALConv.from_conv(layer)


def test_grouped_and_depthwise_convs_are_accepted() -> None:
    assert SAL.unsupported_reason(nn.Conv2d(4, 8, 3, groups=2)) is None
    assert SAL.unsupported_reason(nn.Conv2d(4, 8, 3, groups=4)) is None


@pytest.mark.parametrize("m", [1, 2, 5])
def test_keeps_the_m_largest_taps_of_every_kernel_slice(m: int) -> None:
    layer = LayerCase("Conv2d", 6, 4, (3, 3), groups=2).build()
    module = factorize(SAL, layer, rank=m)
    w = layer.weight.detach().reshape(4, 3, 9)
    kept = module.conv.weight.detach().reshape(4, 3, 9)
    assert torch.equal((kept != 0).sum(dim=-1), torch.full((4, 3), m))
    assert torch.equal(kept[kept != 0], w[kept != 0])  # kept values are the original's (no data)
    smallest_kept = torch.where(kept != 0, w.abs(), torch.inf).amin(dim=-1)
    largest_dropped = torch.where(kept == 0, w.abs(), 0.0).amax(dim=-1)
    assert bool((smallest_kept >= largest_dropped).all())
    assert module.kept_fraction == pytest.approx(m / 9)
    assert (module.conv.groups, module.conv.padding, module.conv.bias is not None) == (2, layer.padding, True)


def test_full_m_is_the_original_and_energy_picks_m_exactly() -> None:
    layer = LayerCase("Conv2d", 4, 6, (3, 3), padding=(1, 1)).build()
    assert torch.equal(sal_weight(layer.weight, 9), layer.weight.detach())
    squares = layer.weight.detach().reshape(6, 4, 9) ** 2
    ranked = torch.sort(squares, dim=-1, descending=True).values.sum(dim=(0, 1))
    for m in range(1, 10):
        target = float(ranked[:m].sum() / ranked.sum())
        assert SAL.resolve_rank(layer, energy=target) == m
        kept = 1 - relative_error(factorize(SAL, layer, rank=m).dense_weight(), layer.weight) ** 2
        assert kept == pytest.approx(target, abs=1e-12)


def test_data_aware_refit_lowers_the_output_error_on_correlated_inputs() -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 16, 3, padding=1).double()
    mix = torch.randn(2, 8, dtype=torch.float64)
    stats = layer_statistics(layer, {"": layer}, [(near_subspace(mix, 32, 8, seed=1, noise=0.05),)])[""]
    heldout = near_subspace(mix, 32, 8, seed=2, noise=0.05)
    with torch.no_grad():
        signal = (layer(heldout) - layer.bias.reshape(1, -1, 1, 1)).norm()
        for m in (1, 2):
            aware = layer_factorizer("sal", layer, stats.covariance).module(m)
            plain = SAL.decompose(layer, m)
            assert torch.equal((aware.conv.weight != 0).sum(dim=(2, 3)), torch.full((16, 8), m))
            error_aware = float((aware(heldout) - layer(heldout)).norm() / signal)
            error_plain = float((plain(heldout) - layer(heldout)).norm() / signal)
            # Measured (aware / weight-only): 0.72 / 0.86 at m=1, 0.42 / 0.70 at m=2.
            assert error_aware <= 0.9 * error_plain, (m, error_aware, error_plain)


def test_the_challenge_score_counts_the_zeros_as_unstructured_pruning() -> None:
    model = tiny_resnet(width=8)
    x = inputs(2, seed=0)
    policy = {"rules": [{"types": ["Conv2d"], "method": "sal", "rank": 2}]}
    fast = convfactor.factorize(model, policy, x, calibration=inputs(32, seed=1))
    report = convfactor.get_report(fast)
    params = list(fast.parameters())
    p_u = sum(int((p == 0).sum()) for p in params) / sum(p.numel() for p in params)
    # Every replaced 3x3 keeps 2 of 9 taps: its 7/9 are zero, a large share of all parameters.
    zeros = sum(int((m.conv.weight == 0).sum()) for m in fast.modules() if isinstance(m, SALConv))
    assert zeros == sum(7 * m.conv.weight[:, :, 0, 0].numel() for m in fast.modules() if isinstance(m, SALConv))
    assert p_u >= 0.5
    pruned = challenge_score(report.params_after, report.macs_after, unstructured_pruning=p_u).score
    assert pruned < challenge_score(report.params_after, report.macs_after).score


def test_the_cli_shorthand_replaces_layers_although_they_save_no_macs() -> None:
    # A shorthand below full rank sets only_if_cheaper; a pruning form is never "cheaper" in MACs.
    model = tiny_resnet(width=8)
    fast = convfactor.factorize(model, "sal:2", inputs(2, seed=0))
    replaced = convfactor.get_report(fast).replaced
    assert replaced and all(d.method == "sal" for d in replaced)
