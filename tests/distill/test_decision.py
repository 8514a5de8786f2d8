"""Which criterion keeps or rejects a distilled state: the task metric on its select set when the user gave one,
else the select part's output error; and the report, summary and CLI say which decided.

The metrics here are built to disagree with the output error: "how far the outputs moved from the undistilled
factorized model's" on a separate set. Every distilled state scores worse (or, with the direction flipped,
better) than the undistilled one by it, whatever the output error does, so a decision made by the error
instead of the metric fails these tests.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import convfactor
from convfactor.distill.criterion import Criterion, Judgement
from convfactor.distill.training import DistillOptions, distill_model
from convfactor.output_checker import OutputChecker
from tests.distill.small import CUT, data, quiet_factorize, small_net


def moved_from(anchor: nn.Module, inputs: torch.Tensor):
    """A 'metric': mean absolute change of the outputs from ``anchor``'s on ``inputs`` (0 for ``anchor``)."""
    with torch.no_grad():
        reference = anchor(inputs)

    def metric(model):
        return float((model(inputs) - reference).abs().mean())

    return metric


@pytest.fixture(scope="module")
def setting():
    model, x = small_net(), data()
    plain = quiet_factorize(model, CUT, x[:1], calibration=x)  # the undistilled result (deterministic)
    return model, x, plain, moved_from(plain, data(32, seed=7)), moved_from(plain, data(32, seed=8))


def test_the_metric_rejects_a_distillation_the_error_would_keep(setting):
    model, x, plain, on_select, on_check = setting
    options = DistillOptions(steps=40, lr=1e-3, check_every=10)
    change = convfactor.Metric(on_check, name="change", higher_is_better=False, select=on_select)
    fast = quiet_factorize(model, CUT, x[:1], calibration=x, metric=change, distill=options)
    report = convfactor.get_report(fast)
    record = report.extra["distill"]
    assert record["decided_by"]["criterion"] == "metric" and record["decided_by"]["metric"] == "change"
    assert record["select_after"] < 0.95 * record["select_before"]  # the error went down: it alone would keep it
    assert record["select_metric_before"] == 0.0 and record["select_metric_after"] > 0
    assert record["returned"] == "undistilled" and not record["improved"]
    assert all("metric" in row for row in record["select"])  # the metric judged every checked state
    with torch.no_grad():
        assert torch.equal(fast(x), plain(x))
    assert any("did not improve the task metric 'change'" in note for note in report.notes)
    # the reported metric is Metric.fn's, on its own set: never the one that decided
    assert report.extra["fidelity_check"]["metric"] == 0.0 and record["after"]["metric"] > 0

    # the same metric without a select set cannot decide: the output error does, and keeps the distilled state
    alone = convfactor.Metric(on_check, name="change", higher_is_better=False)
    report = convfactor.get_report(quiet_factorize(model, CUT, x[:1], calibration=x, metric=alone,
                                                   distill=options))
    record = report.extra["distill"]
    assert record["decided_by"]["criterion"] == "select error" and "has no select set" in record["decided_by"]["why"]
    assert record["returned"] == "distilled" and "select_metric_before" not in record
    assert any(note.startswith("distill: decided by the select part's output error") for note in report.notes)


def test_the_metric_keeps_a_distillation_the_error_would_reject(setting):
    model, x, plain, on_select, on_check = setting
    options = DistillOptions(steps=20, lr=10.0, check_every=5)  # lr 10 wrecks every step: the error only grows
    plain_error = quiet_factorize(model, CUT, x[:1], calibration=x, distill=options)
    assert convfactor.get_report(plain_error).extra["distill"]["returned"] == "undistilled"
    away = convfactor.Metric(on_check, name="away", higher_is_better=True, select=on_select)
    fast = quiet_factorize(model, CUT, x[:1], calibration=x, metric=away, distill=options)
    record = convfactor.get_report(fast).extra["distill"]
    assert record["decided_by"]["criterion"] == "metric"
    assert record["returned"] == "distilled" and record["select_after"] > record["select_before"]
    assert record["select_metric_after"] > record["select_metric_before"] == 0.0
    with torch.no_grad():
        assert not torch.equal(fast(x), plain(x))


def test_early_stopping_keeps_the_best_state_by_the_metric_not_by_the_error():
    teacher, student, x = small_net(0), small_net(1), data(32)
    errors = iter([1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])  # best error at step 10
    scores = iter([0.1, 0.2, 0.4, 0.3, 0.3, 0.3, 0.3])  # best metric (higher is better) at step 20
    states = []

    def score(model):
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores)

    metric = convfactor.Metric(lambda model: 0.0, name="score", select=score)
    checker = OutputChecker(teacher, [(x,)], "select samples", metric=metric, metric_original=0.0)
    run = distill_model(student, teacher, [(x,)], checker, DistillOptions(steps=100, check_every=10, patience=3,
                        lr=1e-3), criterion=Criterion(checker, error=lambda model: next(errors)))
    assert run.best_step == 20 and run.improved and run.steps_run == 50 and run.stopped.startswith("early stop")
    assert run.criterion["criterion"] == "metric" and run.best == Judgement(0.6, 0.4)
    assert all(torch.equal(v, states[2][k]) for k, v in student.state_dict().items())  # the state at step 20


class _Checker:
    def __init__(self, metric):
        self.metric = metric


@pytest.mark.parametrize("higher, candidate, incumbent, better", [
    (False, Judgement(0.9, 0.04), Judgement(0.1, 0.05), True),   # lower CER wins over a lower error
    (False, Judgement(0.1, 0.06), Judgement(0.9, 0.05), False),  # higher CER loses whatever the error
    (True, Judgement(0.9, 0.91), Judgement(0.1, 0.90), True),    # higher F wins
    (True, Judgement(0.2, 0.90), Judgement(0.3, 0.90), True),    # a tie: the lower error decides
    (True, Judgement(0.3, 0.90), Judgement(0.2, 0.90), False),
])
def test_the_one_rule_compares_by_the_metric_in_its_direction_then_by_the_error(higher, candidate, incumbent,
                                                                                better):
    metric = convfactor.Metric(lambda m: 0.0, higher_is_better=higher, select=lambda m: 0.0)
    assert Criterion(_Checker(metric), error=lambda m: 0.0).better(candidate, incumbent) is better
    by_error = Criterion(_Checker(None), error=lambda m: 0.0)
    assert by_error.better(candidate, incumbent) is (candidate.rel_error < incumbent.rel_error)
    assert by_error.describe()["criterion"] == "select error"


ARCH, SHAPE = "tests.cli_models:tiny_net", "1,3,8,8"
METRICS = '''
import torch
_S = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(21))
_C = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(22))

def on_check(model):
    return float(model(_C).abs().mean())

def on_select(model):
    return float(model(_S).abs().mean())
'''


def _convert(cli, ckpt, *extra):
    return cli("convert", ckpt, "--arch", ARCH, "--input-shape", SHAPE, "--policy", "spatial_svd:0.5",
               "--out", ckpt.with_name("fast.pt"), *extra)


def test_cli_select_metric_decides_and_the_summary_says_so(cli, ckpt, tmp_path):
    metrics, calib = tmp_path / "metrics.py", tmp_path / "c.pt"
    metrics.write_text(METRICS)
    torch.save(torch.randn(48, 3, 8, 8, generator=torch.Generator().manual_seed(3)), calib)
    code, out, err = _convert(cli, ckpt, "--calibration", calib, "--distill", "20", "--metric", f"{metrics}:on_check",
                              "--select-metric", f"{metrics}:on_select", "--json")
    assert code == 0, err
    document = json.loads(out)
    record = document["factorize"]["extra"]["distill"]
    assert record["decided_by"]["criterion"] == "metric" and record["decided_by"]["metric"] == "on_check"
    assert document["summary"]["distill"]["decided_by"] == record["decided_by"]
    assert document["summary"]["distill"]["select_metric_before"] == record["select_metric_before"]
    code, text, err = _convert(cli, ckpt, "--calibration", calib, "--distill", "20", "--metric", f"{metrics}:on_check",
                               "--select-metric", f"{metrics}:on_select", "--force")
    assert code == 0 and "decided by the task metric on_check on its select set" in text, text
    code, text, err = _convert(cli, ckpt, "--calibration", calib, "--distill", "20", "--force")
    assert code == 0 and "decided by the select part's output error" in text, text


@pytest.mark.parametrize("extra, message", [
    (("--calibration", "CAL", "--select-metric", "m.py:f"), "--select-metric is only used with --distill"),
    (("--calibration", "CAL", "--distill", "5", "--select-metric", "m.py:f"), "--select-metric needs --metric"),
    (("--calibration", "CAL", "--distill", "5", "--metric", "METRICS:on_check", "--select-metric", "nomodule_x:f"),
     "--select-metric nomodule_x:f: no module named 'nomodule_x'"),
])
def test_cli_bad_select_metric_is_one_error_line_naming_the_flag(cli, ckpt, tmp_path, extra, message):
    metrics, calib = tmp_path / "metrics.py", tmp_path / "c.pt"
    metrics.write_text(METRICS)
    torch.save(torch.randn(48, 3, 8, 8), calib)
    extra = [str(calib) if a == "CAL" else a.replace("METRICS", str(metrics)) for a in extra]
    code, out, err = _convert(cli, ckpt, *extra)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert not ckpt.with_name("fast.pt").exists()
