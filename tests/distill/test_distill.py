"""factorize(..., distill=...): the loss each declared output gets, early stopping on the select part, the
undistilled model kept when distillation does not help, before/after measured on the check part, zeros kept,
and the CLI's --distill."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convfactor
from convfactor.distill.criterion import Criterion
from convfactor.distill.training import DistillOptions, distill_model, output_losses
from convfactor.errors import ConvfactorError
from convfactor.fidelity_spec import parse_fidelity
from convfactor.output_checker import OutputChecker
from convfactor.output_error import plan_layouts
from tests.distill.small import CUT, data, quiet_factorize, small_net


@pytest.fixture(scope="module")
def distilled():
    model, x = small_net(), data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fast = quiet_factorize(model, CUT, x[:1], calibration=x, distill=DistillOptions(steps=60, lr=1e-3))
    return model, x, fast, state


def test_distillation_lowers_the_held_out_error_and_the_report_shows_before_and_after(distilled):
    model, x, fast, state = distilled
    record = convfactor.get_report(fast).extra["distill"]
    assert record["returned"] == "distilled" and record["improved"] and record["best_step"] > 0
    assert record["after"]["rel_error"] < 0.8 * record["before"]["rel_error"]
    assert record["select_after"] < record["select_before"]
    assert record["data"] == {"source": "calibration fit part", "samples": 72}  # 3/4 of 96: never select/check
    assert record["output_losses"] == ["0: kl (declared scores)"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the caller's model untouched


def test_the_reported_check_error_after_distillation_is_the_one_measured_independently(distilled):
    model, x, fast, _ = distilled
    report = convfactor.get_report(fast)
    held = x[7::8]  # the check part: i % 8 == 7
    with torch.no_grad():
        a, b = model(held).double(), fast(held).double()
    error = float((a - b).norm() / a.norm())
    assert report.extra["fidelity_check"]["rel_error"] == pytest.approx(error, rel=1e-4)
    assert report.extra["distill"]["after"]["rel_error"] == pytest.approx(error, rel=1e-4)


def test_a_distillation_that_does_not_help_is_not_returned():
    model, x = small_net(), data()
    plain = quiet_factorize(model, CUT, x[:1], calibration=x)
    # lr 10 wrecks every step: the select error only grows
    fast = quiet_factorize(model, CUT, x[:1], calibration=x, distill=DistillOptions(steps=20, lr=10.0, check_every=5))
    report = convfactor.get_report(fast)
    record = report.extra["distill"]
    assert record["returned"] == "undistilled" and not record["improved"]
    assert record["after"]["rel_error"] > record["before"]["rel_error"]  # the rejected state, measured
    assert any("the undistilled model is returned" in note for note in report.notes)
    with torch.no_grad():
        assert torch.equal(fast(x), plain(x))
    assert report.extra["fidelity_check"]["rel_error"] == record["before"]["rel_error"]


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.boxes, self.scores, self.state = nn.Conv2d(8, 6, 1), nn.Conv2d(8, 3, 1), nn.Conv2d(8, 2, 1)
        with torch.no_grad():
            self.boxes.weight[:3].mul_(1000.0)  # two scales in one output: two slices

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.boxes(h), self.scores(h).mean((2, 3)), self.state(h)


def test_each_declared_output_gets_its_loss_each_slice_on_its_own_scale():
    model, x = TwoHeads().eval(), data(8)
    with torch.no_grad():
        teacher = [t.detach() for t in model(x)]
    spec = parse_fidelity({"outputs": {0: {"kind": "regression"}, 1: {"kind": "scores"}, 2: {"kind": "ignore"}}})
    layouts = plan_layouts(["0", "1", "2"], [t.double().numpy() for t in teacher], spec)
    boxes, scores, state = output_losses(layouts, teacher)
    assert (boxes.kind, scores.kind, state.kind) == ("mse", "kl", "none")
    assert boxes.slices == ((0, 3), (3, 6))
    student = [t + 0.1 * torch.randn_like(t) for t in teacher]
    by_hand = (F.mse_loss(student[0][:, :3], teacher[0][:, :3]) / teacher[0][:, :3].pow(2).mean()
               + F.mse_loss(student[0][:, 3:], teacher[0][:, 3:]) / teacher[0][:, 3:].pow(2).mean()) / 2
    assert float(boxes(student[0], teacher[0], 1.0)) == pytest.approx(float(by_hand), rel=1e-5)
    kl = F.kl_div(F.log_softmax(student[1], 1), F.log_softmax(teacher[1], 1), log_target=True, reduction="batchmean")
    assert float(scores(student[1], teacher[1], 1.0)) == pytest.approx(float(kl), rel=1e-5)
    assert state(student[2], teacher[2], 1.0) is None


def _checker(model: nn.Module, x: torch.Tensor) -> OutputChecker:
    return OutputChecker(model, [(x,)], "select samples")


def test_early_stopping_keeps_the_best_checked_state():
    teacher, x = small_net(0), data(32)
    student = small_net(1)
    errors, states = iter([1.0, 0.5, 0.6, 0.7, 0.8, 0.9]), []

    def judge(model):
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(errors)

    run = distill_model(student, teacher, [(x,)], _checker(teacher, x), DistillOptions(steps=100, check_every=10,
                        patience=3, lr=1e-3), criterion=Criterion(_checker(teacher, x), error=judge))
    assert run.steps_run == 40 and run.best_step == 10 and run.improved and run.stopped.startswith("early stop")
    assert [row["step"] for row in run.select] == [0, 10, 20, 30, 40]
    assert all(torch.equal(v, states[1][k]) for k, v in student.state_dict().items())  # the state at step 10


def test_the_time_budget_stops_it():
    teacher, x = small_net(0), data(32)
    run = distill_model(small_net(1), teacher, [(x,)], _checker(teacher, x),
                        DistillOptions(steps=10_000, time_budget=0.3))
    assert run.stopped.startswith("time budget") and 0 < run.steps_run < 10_000
    assert run.select[-1]["step"] == run.steps_run  # the last state was judged too


class Sparse(nn.Module):
    """A conv whose declared structural zeros (every other weight) must stay zero."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.mask = torch.arange(self.conv.weight.numel()).reshape(self.conv.weight.shape) % 2 == 0
        with torch.no_grad():
            self.conv.weight[self.mask] = 0.0

    def structural_zeros(self):
        return {"conv.weight": self.mask}

    def forward(self, x):
        return self.conv(x)


def test_structural_zeros_stay_zero():
    torch.manual_seed(0)
    teacher, student, x = nn.Conv2d(3, 4, 3, padding=1).eval(), Sparse(), data(16)
    before = student.conv.weight.detach().clone()
    run = distill_model(student, teacher, [(x,)], _checker(teacher, x), DistillOptions(steps=20, lr=1e-2,
                        check_every=5))
    assert run.fixed_zeros == int(student.mask.sum()) and run.improved
    assert torch.all(student.conv.weight[student.mask] == 0)
    assert not torch.equal(student.conv.weight[~student.mask], before[~student.mask])


@pytest.mark.parametrize("distill, message", [
    (True, "distill must be a number of steps"),
    (0, "distill steps must be a whole number >= 1"),
    (DistillOptions.__new__(DistillOptions), None),
])
def test_bad_distill_values_fail_before_any_work(distill, message):
    if message is None:
        with pytest.raises(ConvfactorError, match="lr must be a positive number"):
            DistillOptions(steps=5, lr=-1)
        with pytest.raises(ConvfactorError, match="needs calibration"):
            convfactor.factorize(small_net(), CUT, data(1), distill=5)
        return
    with pytest.raises(ConvfactorError, match=message):
        convfactor.factorize(small_net(), CUT, data(1), calibration=data(), distill=distill)


ARCH, SHAPE = "tests.cli_models:tiny_net", "1,3,8,8"


def _convert(cli, ckpt, *extra):
    return cli("convert", ckpt, "--arch", ARCH, "--input-shape", SHAPE, "--policy", "spatial_svd:0.5",
               "--out", ckpt.with_name("fast.pt"), *extra)


def test_cli_distill_writes_before_and_after_to_the_report_and_the_summary(cli, ckpt, tmp_path):
    calib = tmp_path / "c.pt"
    torch.save(torch.randn(48, 3, 8, 8, generator=torch.Generator().manual_seed(3)), calib)
    code, out, err = _convert(cli, ckpt, "--calibration", calib, "--distill", "20", "--class-scores", "0", "--json")
    assert code == 0, err
    document = json.loads(out)
    record = document["factorize"]["extra"]["distill"]
    assert record["options"]["steps"] == 20 and 0 < record["steps_run"] <= 20
    assert {"before", "after", "returned", "select_before"} <= set(record)
    assert document["summary"]["distill"]["before"] == record["before"]
    saved = json.loads(ckpt.with_name("fast.report.json").read_text())
    assert saved["factorize"]["extra"]["distill"]["after"] == record["after"]
    unlabelled = tmp_path / "u.pt"
    torch.save(torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(4)), unlabelled)
    code, text, _ = _convert(cli, ckpt, "--calibration", calib, "--distill", "20", "--distill-data", unlabelled,
                             "--force")
    assert code == 0 and "distillation" in text and "before -> after" in text, text
    saved = json.loads(ckpt.with_name("fast.report.json").read_text())
    assert saved["factorize"]["extra"]["distill"]["data"] == {"source": "distill data", "samples": 40}


def test_the_distillation_gets_what_the_time_budget_left():
    from convfactor.distill.result import _time_left

    assert _time_left(DistillOptions(), {"time_budget": {"seconds": 60, "used": 45.5}}) == 14.5
    assert _time_left(DistillOptions(), {"time_budget": {"seconds": 60, "used": 70}}) == 0.0
    assert _time_left(DistillOptions(time_budget=5), {"time_budget": {"seconds": 60, "used": 1}}) == 5
    assert _time_left(DistillOptions(), {}) is None


@pytest.mark.parametrize("extra, message", [
    (("--distill", "x"), "--distill: expected a whole number of steps >= 1, got 'x'"),
    (("--distill", "0"), "--distill: expected a whole number of steps >= 1, got '0'"),
    (("--distill", "10"), "--distill needs --calibration"),
    (("--distill-data", "d.pt"), "--distill-data is only used with --distill"),
])
def test_cli_bad_distill_is_one_error_line_naming_the_flag(cli, ckpt, extra, message):
    code, out, err = _convert(cli, ckpt, *extra)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert not ckpt.with_name("fast.pt").exists()


def test_the_bound_search_distils_failing_probes_and_returns_a_cheaper_model():
    model, x = small_net(), data()
    bounded = {"rules": [{"types": ["Conv2d"], "method": "spatial_svd"}],
               "fidelity": {"max_rel_error": 0.02, "outputs": {0: {"kind": "scores"}}}}
    plain = convfactor.get_report(quiet_factorize(model, bounded, x[:1], calibration=x))
    options = DistillOptions(steps=60, lr=1e-3, probes=2, probe_steps=30)
    report = convfactor.get_report(quiet_factorize(model, bounded, x[:1], calibration=x, distill=options))
    probes = report.extra["auto"]["search"]["distilled_probes"]
    assert probes["limit"] == 2 and probes["steps"] == 30 and 1 <= len(probes["probes"]) <= 2
    assert all(p["distilled_rel_error"] <= p["undistilled_rel_error"] for p in probes["probes"])
    assert report.macs_after < plain.macs_after  # distilled probes hold the bound at a lower budget
    assert report.extra["fidelity_check"]["rel_error"] == report.extra["distill"]["after"]["rel_error"] or \
        report.extra["distill"]["returned"] == "undistilled"



def test_the_metric_of_the_original_is_the_original_s():
    model, x = small_net(), data()
    held = data(64, seed=5)
    with torch.no_grad():
        reference = model(held)

    def spread(module):  # 0 for the original only
        with torch.no_grad():
            return float((module(held) - reference).abs().mean())

    fast = quiet_factorize(model, CUT, x[:1], calibration=x, metric=spread)
    check = convfactor.get_report(fast).extra["fidelity_check"]
    assert check["metric_original"] == 0.0 and check["metric"] == pytest.approx(spread(fast), rel=1e-4)
    assert check["metric"] > 0
