"""The fidelity search measures the model it would return (data-aware, refit), and a time budget cuts refinement."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import convfactor
from convfactor.auto import AutoOptions

BOUND = 0.05


class LowRankInputsNet(nn.Module):
    """conv1 reads 16 channels that the data fills in only 2 directions: data-aware factors of a low rank are
    near exact on it, factors of the weight alone are not."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean((2, 3)))


def low_rank_inputs(count: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    z = torch.randn(count, 2, 8, 8, generator=g)
    return torch.einsum("cd,ndhw->nchw", mix, z) + 0.01 * torch.randn(count, 16, 8, 8, generator=g)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return LowRankInputsNet().eval()


CALIBRATION = low_rank_inputs(64, seed=1)


def rel_error(a: nn.Module, b: nn.Module, x: torch.Tensor = CALIBRATION) -> float:
    with torch.no_grad():
        ya, yb = a(x), b(x)
    return float((ya - yb).norm() / ya.norm())


SELECT = CALIBRATION[3::8]  # the part of the calibration data the search decides by (convfactor.auto.statistics.split)


def policy(target: float) -> dict:
    return {"rules": [{"types": ["Conv2d"], "method": "spatial_svd"}], "target": {"macs": target},
            "fidelity": {"max_rel_error": BOUND}}


def factorize(net, target, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convfactor.factorize(net, policy(target), CALIBRATION[:1], calibration=CALIBRATION,
                                    auto_options=AutoOptions(speed_check=False, **options))


def test_the_search_holds_the_bound_on_the_refit_model_where_weight_factors_break_it(net):
    fast = factorize(net, 0.3)
    report = convfactor.get_report(fast)
    # The model returned is factorized, cheaper than the original and holds the bound, measured here.
    assert report.macs_ratio <= 0.3 + 1e-3 and all(d.status == "replaced" for d in report.layers
                                                    if d.name.startswith("conv"))
    assert rel_error(net, fast) <= BOUND
    search = report.extra["auto"]["search"]
    assert search["probe_models"] == "as returned (sequential refit)" and "missed" not in search
    assert search["fidelity"]["rel_error"] == pytest.approx(rel_error(net, fast, SELECT), rel=1e-3)
    # The probe the search used to measure (factors of the weights alone, no refit) breaks the bound at the
    # same allocation: judged by it, the search would have bought back MACs (or the original model).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weight_only = convfactor.factorize(net, report.policy["resolved"], CALIBRATION[:1])
    assert rel_error(net, weight_only) > 2 * BOUND


def test_a_target_the_bound_does_not_allow_is_missed_by_name_with_the_shortfall(net):
    fast = factorize(net, 0.1)
    report = convfactor.get_report(fast)
    assert rel_error(net, fast) <= BOUND and 0.1 < report.macs_ratio < 1.0
    missed = report.extra["auto"]["search"]["missed"]
    assert missed["target"] == 0.1 and missed["shortfall"] == pytest.approx(report.macs_ratio - 0.1, abs=2e-3)
    assert missed["message"].startswith("target macs 0.1 missed") and f"(+{report.macs_ratio - 0.1:.3f})" \
        in missed["message"]
    assert any(w.startswith("speed: target macs 0.1 missed") for w in report.warnings)


def test_probes_share_the_refit_of_common_prefixes(net):
    fast = factorize(net, 0.1)
    search = convfactor.get_report(fast).extra["auto"]["search"]
    builds, _ = search["checks"]["builds"]
    # One build per distinct allocation measured; the returned model is one of them (no refit of its own).
    assert 2 <= builds <= search["checks"]["fidelity"][0] + 1


def test_a_spent_time_budget_cuts_refinement_and_says_so(net):
    fast = factorize(net, 0.3, time_budget=1e-6)
    report = convfactor.get_report(fast)
    cut = "\n".join(w for w in report.warnings if w.startswith("accuracy: time budget 1e-06 s spent after"))
    assert "sensitivity probes stopped after 0 of 2 layers" in cut
    assert "sequential refit stopped" in cut
    assert report.extra["auto"]["time_budget"]["seconds"] == 1e-6
    # Still a measured answer: the result is checked against the bound like any other.
    assert report.extra["fidelity_check"]["rel_error"] == pytest.approx(rel_error(net, fast), rel=1e-3)


def test_a_generous_time_budget_changes_nothing(net):
    plain, budgeted = factorize(net, 0.3), factorize(net, 0.3, time_budget=3600.0)
    assert convfactor.get_report(budgeted).policy["resolved"] == convfactor.get_report(plain).policy["resolved"]
    assert not [w for w in convfactor.get_report(budgeted).warnings if w.startswith("time budget")]


@pytest.mark.parametrize("bad", [0, -1.0, True])
def test_time_budget_must_be_positive_seconds(bad):
    with pytest.raises(ValueError, match="time_budget must be a positive number of seconds"):
        AutoOptions(time_budget=bad)


def test_refits_are_cached_by_prefix_and_reproduce_a_fresh_refit(net):
    from convfactor.auto.search.refit import Replacements
    from convfactor.auto.selection.candidates import Option
    from convfactor.auto.selection.plans import plan_layers, set_shapes_and_calls
    from convfactor.policy import Policy

    opts = AutoOptions()
    plans = plan_layers(net, Policy.from_any(policy(0.3)), opts)
    set_shapes_and_calls(net, plans, {}, None)
    conv1, conv2 = (p for p in plans if p.name in ("conv1", "conv2"))
    batches = [(CALIBRATION[:32],), (CALIBRATION[32:],)]

    def replacements():
        return Replacements(net, plans, opts, batches=batches, inputs=(CALIBRATION[:1],))

    conv1.chosen, conv2.chosen = Option("spatial_svd", 6, None, 0), Option("spatial_svd", 12, None, 0)
    cached = replacements()
    first = cached.build()
    assert cached.fits == 2
    conv2.chosen = Option("spatial_svd", 16, None, 0)  # conv1's prefix is unchanged: only conv2 is refit
    second = cached.build()
    assert cached.fits == 3 and second["conv1"] is first["conv1"]
    fresh = replacements().build()
    for name in ("conv1", "conv2"):
        for a, b in zip(second[name].parameters(), fresh[name].parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
