"""Held-out, per-head fidelity: what no fit saw, every output slice on its own scale, the user's metric."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import convfactor
from convfactor.auto import AutoOptions
from convfactor.auto.search.verify import ConvfactorWarning, FidelityWarning
from convfactor.auto.statistics.split import MIN_PART, split_data
from convfactor.errors import PolicyError
from convfactor.fidelity_spec import parse_fidelity
from convfactor.output_error import ErrorAccumulator, plan_layouts, scale_slices
from convfactor.runtime.fidelity import check_fidelity
from tests.auto.conftest import inputs, tiny_resnet


def factorize_caught(*args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = convfactor.factorize(*args, **kwargs)
    return fast, [(w.category, str(w.message)) for w in caught if issubclass(w.category, ConvfactorWarning)]


class TwoHeads(nn.Module):
    """A box head of ~1000x the norm of a 2-channel score head: the score head's loss hides in a pooled error."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Conv2d(3, 16, 3, padding=1)
        self.boxes = nn.Conv2d(16, 4, 1)
        self.scores = nn.Conv2d(16, 2, 1)
        with torch.no_grad():
            self.boxes.weight.mul_(1000.0)
            # Two equal singular values: a rank-1 SVD of the score head loses half its energy.
            u, _, vh = torch.linalg.svd(torch.randn(2, 16), full_matrices=False)
            self.scores.weight.copy_((u @ vh).reshape(2, 16, 1, 1))

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.boxes(h), self.scores(h)


SCORE_CUT = {"rules": [{"match": "scores", "method": "svd", "rank": 1}]}


def test_a_destroyed_small_head_fails_the_check_though_the_pooled_error_passes():
    model, x = TwoHeads().eval(), inputs(64, seed=1, size=8)
    fast, caught = factorize_caught(model, SCORE_CUT, x[:1], calibration=x)
    check = convfactor.get_report(fast).extra["fidelity_check"]
    with torch.no_grad():
        held = x[7::8]  # the check part of the split: never fitted on, never selected on
        (box_a, score_a), (box_b, score_b) = model(held), fast(held)
    score_error = float((score_a - score_b).norm() / score_a.norm())
    pooled = float(torch.sqrt(((box_a - box_b) ** 2).sum() + ((score_a - score_b) ** 2).sum())
                   / torch.sqrt((box_a ** 2).sum() + (score_a ** 2).sum()))
    assert pooled < 0.01 < 0.3 < score_error  # pooled, it would pass the default floor of 0.3
    assert check["pooled_rel_error"] == pytest.approx(pooled, rel=1e-3)
    assert check["rel_error"] == pytest.approx(score_error, rel=1e-3) and check["worst"] == "1"
    assert check["passed"] is False and check["held_out"] and check["samples"] == 8
    assert any(c is FidelityWarning and "accuracy not kept" in m and "(1)" in m for c, m in caught)
    assert [row["name"] for row in check["outputs"]] == ["0", "1"]
    # Control: the same model, the reduction the policy can choose instead, passes (the mechanism is the pooling).
    pooled_policy = {**SCORE_CUT, "fidelity": {"reduce": "pooled", "max_rel_error": 0.3}}
    fast, _ = factorize_caught(model, pooled_policy, x[:1], calibration=x)
    assert convfactor.get_report(fast).extra["fidelity_check"]["passed"] is True


def test_onnxruntime_check_judges_each_slice_of_one_tensor_on_its_own_scale():
    """A YOLO-style [N, 4 + C, A] tensor: boxes ~10^4, classes ~1; the class rows are destroyed."""
    rng = np.random.default_rng(0)
    a = np.concatenate([1e4 * rng.normal(size=(2, 4, 50)), rng.normal(size=(2, 6, 50))], axis=1)
    b = a.copy()
    b[:, 4:] = rng.normal(size=(2, 6, 50))
    layout = plan_layouts(["out"], [a], None)[0]
    assert [s[1:] for s in layout.slices] == [(0, 4), (4, 10)]
    acc = ErrorAccumulator([layout])
    acc.add([a], [b])
    result = acc.result()
    assert result["pooled_rel_error"] < 1e-3 and result["worst_rel_error"] > 1.0 and result["worst"] == "out[4:10]"
    assert result["agreement"] is None  # not declared as class scores

    class Head(nn.Module):
        def __init__(self, destroy: bool):
            super().__init__()
            self.destroy = destroy

        def forward(self, x):  # x: [N, 10, 50]
            scale = torch.cat([torch.full((4, 1), 1e4), torch.ones(6, 1)])
            y = x * scale
            return torch.cat([y[:, :4], -y[:, 4:]], dim=1) if self.destroy else y

    x = torch.randn(4, 10, 50)
    report = check_fidelity(Head(False), Head(True), x, exporter="torchscript", min_cosine=None, min_snr_db=None)
    assert not report.passed and report.failed_criteria() == ["output.worst_slice_rel_error"]
    pooled = check_fidelity(Head(False), Head(True), x, exporter="torchscript", min_cosine=None, min_snr_db=None,
                            reduce="pooled")
    assert pooled.passed  # the same outputs, pooled: the destroyed class rows are invisible


class Recurrent(nn.Module):
    """One prediction [N, 1] and a recurrent state [N, 32] in and out."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv1d(1, 8, 5, padding=2)
        self.cell = nn.GRUCell(8, 32)
        self.out = nn.Linear(32, 1)

    def forward(self, x, state):
        h = self.conv(x).mean(-1)
        state = self.cell(h, state)
        return torch.sigmoid(self.out(state)), state


def test_a_recurrent_state_is_never_argmaxed_and_declared_scores_are():
    model = Recurrent().eval()
    x, state = torch.randn(40, 1, 64), torch.randn(40, 32)
    policy = {"rules": [{"match": "out", "method": "svd", "rank": 1}]}
    fast, _ = factorize_caught(model, policy, (x[:1], state[:1]), calibration=(x, state))
    check = convfactor.get_report(fast).extra["fidelity_check"]
    assert check["agreement"] is None and all("agreement" not in row for row in check["outputs"])
    report = check_fidelity(model, fast, (x, state), exporter="torchscript")
    assert all("top1_agreement" not in o.metrics for o in report.outputs)
    declared = check_fidelity(model, fast, (x, state), exporter="torchscript", outputs={1: {"kind": "scores"}})
    assert ["top1_agreement" in o.metrics for o in declared.outputs] == [False, True]


def test_the_split_is_interleaved_deterministic_and_has_a_floor():
    x = torch.arange(64, dtype=torch.float32).reshape(64, 1)
    batches = list(zip(x.split(10)))
    split = split_data(batches, None, None)
    picked = {part: torch.cat([b[0] for b in getattr(split, part)]).flatten().tolist()
              for part in ("fit", "select", "check")}
    assert picked["select"] == list(range(3, 64, 8)) and picked["check"] == list(range(7, 64, 8))
    assert sorted(picked["fit"] + picked["select"] + picked["check"]) == list(range(64)) and split.held_out
    assert max(len(b[0]) for b in split.fit) <= 10  # regrouped, never larger than the batches given
    small = split_data([(x[:MIN_PART * 8 - 1],)], None, None)
    assert not small.held_out and small.check is small.select and "none held out" in small.notes[0]
    validation = split_data(batches, [(x[:10],)], None)
    assert validation.fit is batches and validation.describe()["select"] == 5 and validation.describe()["check"] == 5


def test_too_little_calibration_is_said_to_be_in_sample():
    net, x = tiny_resnet(seed=2), inputs(16, seed=3)
    fast, caught = factorize_caught(net, "spatial_svd:0.5", x[:1], calibration=x)
    check = convfactor.get_report(fast).extra["fidelity_check"]
    assert check["held_out"] is False and "not held out" in check["data"]
    assert any(c is FidelityWarning and "held-out error is unknown" in m for c, m in caught)


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _overfitting_calibration():
    """Fit samples on a 6-dimensional subspace, held-out samples everywhere: a data-aware fit at rank 8 is
    near exact on the subspace and blind off it."""
    g = torch.Generator().manual_seed(4)
    basis = torch.randn(6, 64, generator=g)
    x = torch.randn(64, 6, generator=g) @ basis
    held = torch.randn(64, 64, generator=g)
    x[3::8], x[7::8] = held[3::8], held[7::8]  # the select and check parts of the split
    return x


POLICY = {"rules": [{"match": "fc1", "method": "svd", "rank": 8}, {"match": "fc2", "method": "skip"}]}


def test_an_overfit_is_caught_when_not_regularized(monkeypatch):
    import convfactor.auto.phases as phases

    monkeypatch.setattr(phases, "regularize", lambda root, plans, opts, replacements, prebuilt, *a, **k: (prebuilt, None))
    fast, caught = factorize_caught(Wide().eval(), POLICY, torch.zeros(1, 64), calibration=_overfitting_calibration())
    check = convfactor.get_report(fast).extra["fidelity_check"]
    assert check["in_sample"]["rel_error"] < 0.05 and check["overfit"] > 2  # passes in-sample, fails held out
    assert not check["passed"] and any(c is FidelityWarning and "overfits" in m for c, m in caught)


def test_an_overfit_is_regularized_by_held_out_error():
    x = _overfitting_calibration()
    model = Wide().eval()
    fast, _ = factorize_caught(model, POLICY, torch.zeros(1, 64), calibration=x)
    auto = convfactor.get_report(fast).extra["auto"]
    account = auto["regularization"]
    assert account["overfit_ratio"] > 2 and account["kept"] != account["tried"][0]["fit"]
    errors = {t["fit"]: t["select_error"] for t in account["tried"]}
    assert errors[account["kept"]] == min(errors.values()) < 0.9 * errors[account["tried"][0]["fit"]]
    with torch.no_grad():  # measured here, on the check part no fit and no choice saw
        ya, yb = model(x[7::8]), fast(x[7::8])
    held_out = float((ya - yb).norm() / ya.norm())
    assert convfactor.get_report(fast).extra["fidelity_check"]["rel_error"] == pytest.approx(held_out, rel=1e-3)


def test_a_regularization_never_trades_the_bound_for_output_error():
    """Under a metric bound, the rebuild with the lowest select error fails the metric (it is blind on the
    fit subspace the user's data lies on): the build kept holds the bound, the lowest-error one of those that do."""
    x, model = _overfitting_calibration(), Wide().eval()
    basis = torch.randn(6, 64, generator=torch.Generator().manual_seed(4))  # the fit samples' subspace
    on_subspace = torch.randn(128, 6, generator=torch.Generator().manual_seed(9)) @ basis
    with torch.no_grad():
        reference = model(on_subspace)

    def subspace_fit(module):  # 0 for the original, -relative error on the user's data otherwise
        with torch.no_grad():
            return -float((module(on_subspace) - reference).norm() / reference.norm())

    policy = dict(POLICY, fidelity={"max_metric_drop": 0.05})
    fast, _ = factorize_caught(model, policy, torch.zeros(1, 64), calibration=x, metric=subspace_fit)
    report = convfactor.get_report(fast)
    account = report.extra["auto"]["regularization"]
    tried = {t["fit"]: t for t in account["tried"]}
    lowest = min(tried.values(), key=lambda t: t["select_error"])
    assert lowest["holds_bound"] is False and "drop" in lowest["fails"]  # the output error alone would keep it
    holding = [t for t in tried.values() if t.get("holds_bound")]
    assert holding and account["kept"] == min(holding, key=lambda t: t["select_error"])["fit"]
    # The first build's metric was not needed: a rebuild of lower select error held the bound.
    assert "holds_bound" not in account["tried"][0] and account["tried"][1]["holds_bound"] is True
    check = report.extra["fidelity_check"]
    assert check["passed"] and check["metric_drop"] <= 0.05
    assert check["metric"] == pytest.approx(subspace_fit(fast), rel=1e-4)  # the report rounds to 5 digits

    # The search's probes spend all 4 metric evaluations: no build's standing is known, the select error
    # decides, the account and the note say so.
    fast, _ = factorize_caught(model, policy, torch.zeros(1, 64), calibration=x, metric=subspace_fit,
                               auto_options=AutoOptions(metric_evaluations=4))
    auto = convfactor.get_report(fast).extra["auto"]
    tried = auto["regularization"]["tried"]
    assert all(t.get("holds_bound", None) is None for t in tried) and any("holds_bound" in t for t in tried)
    assert auto["regularization"]["kept"] == min(tried, key=lambda t: t["select_error"])["fit"]
    assert any("bound not measured" in n for n in auto["notes"])


def test_a_metric_drives_the_bisection_to_the_cheapest_model_that_keeps_it():
    net = tiny_resnet(seed=2, width=16)
    data = inputs(96, seed=7)
    with torch.no_grad():
        labels = net(data).argmax(1)  # the original scores 1.0 by construction

    def accuracy(model):
        with torch.no_grad():
            return float((model(data).argmax(1) == labels).float().mean())

    policy = {"rules": [{"types": ["Conv2d"], "method": "spatial_svd"}], "target": {"macs": 0.3},
              "fidelity": {"max_metric_drop": 0.1}}
    fast, caught = factorize_caught(net, policy, data[:1], metric=accuracy)
    report = convfactor.get_report(fast)
    check, search = report.extra["fidelity_check"], report.extra["auto"]["search"]
    assert check["metric_original"] == 1.0 and check["metric"] == pytest.approx(accuracy(fast), rel=1e-4)
    assert accuracy(fast) >= 0.9 and check["passed"]
    probes = search["probes"]
    assert not probes[0]["fidelity_ok"] and probes[0]["metric"] < 0.9  # the target itself broke the metric
    assert all(not p["fidelity_ok"] for p in probes if p["fraction"] < report.macs_ratio - 1e-3)  # the cheapest
    assert len([p for p in probes if "metric" in p]) <= 12  # bounded: AutoOptions.metric_evaluations
    assert any("target macs 0.3 missed" in m for _, m in caught)


def test_metric_bounds_need_a_metric_and_output_declarations_are_checked():
    net = tiny_resnet(seed=2)
    with pytest.raises(PolicyError, match="need the task metric"):
        convfactor.factorize(net, {"rules": [{"types": ["Conv2d"], "method": "auto"}],
                                   "fidelity": {"max_metric_drop": 0.1}}, inputs(1, seed=0))
    with pytest.raises(PolicyError, match="slice 'boxes' .* exceeds the 10 entries"):
        convfactor.factorize(net, {"rules": [{"types": ["Conv2d"], "method": "spatial_svd", "rank": 0.5}],
                                   "fidelity": {"outputs": {0: {"slices": {"boxes": [0, 40]}}}}},
                             inputs(1, seed=0), calibration=inputs(32, seed=1))
    for bad, message in [({"outputs": {0: {"kind": "logits"}}}, "kind must be one of"),
                         ({"outputs": {0: {"axis": 0}}}, "axis must be an int >= 1"),
                         ({"reduce": "mean"}, "reduce must be one of"), ({"max_metric_drop": -1}, ">= 0"),
                         ({"outputs": {0: {"slices": {"a": [3, 1]}}}}, "0 <= start < stop")]:
        with pytest.raises(PolicyError, match=message):
            parse_fidelity(bad)
    spec = parse_fidelity({"max_rel_error": 0.1, "outputs": {0: {"kind": "scores"}, "boxes": {"slices": {"xy": [0, 2]}}}})
    assert parse_fidelity(spec.to_dict()) == spec


def test_scale_slices_split_at_consistent_jumps_only():
    assert [s[1:] for s in scale_slices(np.array([5.0, 3.0, 0.0, 4.0, 0.01, 0.02]))] == [(0, 4), (4, 6)]
    assert [s[1:] for s in scale_slices(np.array([1.0] * 5))] == [(0, 5)]
    # A smooth decay over 40 bins (1 to 1e-6) has no head boundary: no adjacent pair jumps by 100x.
    assert len(scale_slices(np.logspace(0, -6, 40))) == 1
    # Which bin is active varies by sample (a pitch posterior): jumps that flip between samples are content.
    rng = np.random.default_rng(2)
    posterior = np.full((16, 60), 1e-5)
    posterior[np.arange(16), rng.integers(0, 60, 16)] = 1.0
    assert len(scale_slices(posterior)) == 1
    heads = np.concatenate([1e4 * (1 + rng.random((16, 4))), 1 + rng.random((16, 6))], axis=1)
    assert [s[1:] for s in scale_slices(heads)] == [(0, 4), (4, 10)]


@pytest.mark.parametrize("shape, axis", [((8, 10), 1), ((1, 84, 8400), 1), ((2, 8732, 25), 2), ((2, 64, 80, 80), 1),
                                         ((2, 128, 128, 2), 3), ((2, 256, 7, 7), 1), ((8,), None), ((), None)])
def test_the_default_feature_axis_is_channel_like_never_spatial(shape, axis):
    from convfactor.output_error import feature_axis

    assert feature_axis(shape) == axis


def test_a_spatial_axis_with_content_dependent_scale_stays_one_slice():
    """A channels-last score map [N, H, W, 2] whose rows are mostly background: its channel axis is sliced,
    and an axis with more scale runs than MAX_AUTO_SLICES (no head structure) stays one slice."""
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(2, 40, 40, 2)) * np.where(np.arange(40) % 2 == 0, 1.0, 1e-4)[None, :, None, None]
    (layout,) = plan_layouts(["maps"], [maps], None)
    assert layout.axis == 3 and len(layout.slices) == 1
    (forced,) = plan_layouts(["maps"], [maps], parse_fidelity({"outputs": {0: {"axis": 1}}}))
    assert forced.axis == 1 and [s[1:] for s in forced.slices] == [(0, 40)]


def test_the_metric_of_the_original_is_the_original_s_even_when_no_probe_needed_it():
    """The pipeline rewrites its network in place after the resolution: the original's metric is taken first."""
    net = tiny_resnet(seed=2, width=16)
    data = inputs(64, seed=8)
    with torch.no_grad():
        labels = net(data).argmax(1)

    def accuracy(model):
        with torch.no_grad():
            return float((model(data).argmax(1) == labels).float().mean())

    fast, _ = factorize_caught(net, "spatial_svd:0.1", data[:1], metric=accuracy)
    check = convfactor.get_report(fast).extra["fidelity_check"]
    assert check["metric_original"] == 1.0 and check["metric"] == pytest.approx(accuracy(fast), rel=1e-4)
    assert accuracy(fast) < 1.0  # the result differs: the two numbers are not the same evaluation
