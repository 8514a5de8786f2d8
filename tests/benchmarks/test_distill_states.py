"""The distillation benchmark's held-out bookkeeping: the reported inputs checked against the others, the reported
metric of every judged state, and the state a shorter time budget would have returned (by the run's own rule)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convfactor
from benchmarks.real.distill_cases import disjoint, metric_inputs
from benchmarks.real.distill_states import StateRecorder, budget_state


def test_disjoint_names_the_set_that_shares_a_reported_input():
    x = torch.arange(24.0).reshape(4, 6)
    disjoint(x, {"calibration": x + 100, "distillation": None})  # nothing shared: no error
    with pytest.raises(SystemExit, match="1 of the 4 inputs the metric is reported on are also distillation"):
        disjoint(x, {"calibration": x + 100, "distillation": torch.cat([x[2:3] + 50, x[1:2]])})


def test_metric_inputs_are_what_the_metric_ran_the_model_on():
    model, x = nn.Linear(3, 2), torch.randn(5, 3)

    def metric(run):
        return float(run(x[:2]).sum() + run(x[2:]).sum())

    value, seen = metric_inputs(metric, model)
    assert torch.equal(seen, x)
    assert value == pytest.approx(float(model(x).detach().sum()), rel=1e-5)


def _metric(higher_is_better: bool = False) -> convfactor.Metric:
    def weight_sum(model):
        return float(model.weight.sum())
    return convfactor.Metric(weight_sum, name="w", higher_is_better=higher_is_better, select=lambda m: -weight_sum(m))


def test_the_recorder_measures_the_reported_metric_of_each_judged_state():
    model = nn.Linear(2, 1, bias=False)
    recorder = StateRecorder(_metric())
    judged = []
    for step, value in enumerate((1.0, 3.0, -2.0)):
        with torch.no_grad():
            model.weight.fill_(value)
        judged.append({"step": step, "metric": recorder.wrapped.on_select(model)})  # as Criterion.judge calls it
    assert [j["metric"] for j in judged] == [-2.0, -6.0, 4.0]  # the select function still answers
    out = recorder.reported(model, judged)
    assert [j["reported"] for j in out] == [2.0, 6.0, -4.0]  # each state's own weights, not the last ones
    assert torch.all(model.weight == -2.0)  # the model itself is left as it is
    other = StateRecorder(_metric())
    other.wrapped.on_select(model)
    with pytest.raises(RuntimeError, match="1 states recorded for 3 judged"):  # not the run's states: no guess
        other.reported(model, judged)
    assert recorder.reported(nn.Linear(2, 1, bias=False), []) == []  # another model's states are not its own


def test_the_recorder_needs_a_select_set():
    with pytest.raises(SystemExit, match="--metric-decides"):
        StateRecorder(convfactor.Metric(lambda m: 0.0))


JUDGED = [{"step": 0, "seconds": 30, "rel_error": 0.24, "metric": 0.068},
          {"step": 30, "seconds": 90, "rel_error": 0.30, "metric": 0.068},
          {"step": 60, "seconds": 150, "rel_error": 0.26, "metric": 0.061},
          {"step": 90, "seconds": 220, "rel_error": 0.25, "metric": 0.061},
          {"step": 120, "seconds": 310, "rel_error": 0.23, "metric": 0.048}]


@pytest.mark.parametrize("seconds, step", [(20, 0), (100, 0), (160, 60), (300, 90), (900, 120)])
def test_a_budget_returns_the_best_state_judged_by_then(seconds, step):
    # lower is better: step 30 ties the undistilled metric with a higher error (not better); step 90 ties step 60
    # with a lower error (better); step 120 comes after 300 s
    assert budget_state(JUDGED, seconds, _metric(higher_is_better=False))["step"] == step


def test_a_budget_follows_the_metric_direction():
    assert budget_state(JUDGED, 900, _metric(higher_is_better=True))["step"] == 0  # every later metric is lower
