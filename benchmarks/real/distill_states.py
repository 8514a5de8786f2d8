"""The reported task metric at every state a distillation judged, and the state a shorter time budget would
have returned: so one long run says what a 5-minute and a 15-minute budget each give.

A distillation judges its state every ``check_every`` steps on the metric's *select* set and keeps the best
(``convfactor.distill.criterion``); the reported metric (``Metric.fn``, the held-out set) is measured for the
returned state only. ``StateRecorder`` wraps the metric's select function to keep a copy of each judged
state's weights; after the run, ``reported`` measures the reported metric of each copy. Nothing decides by
those numbers: the run has ended, and ``budget_state`` picks the state a budget of ``seconds`` would have
returned by the run's own rule (``Criterion.better`` on the select judgements of the states judged by then;
a run stopped by its budget also judges its last state, which this reading of a longer run cannot see).
"""
from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace
from typing import Any

from torch import nn

from convfactor import Metric
from convfactor.distill.criterion import Criterion, Judgement

__all__ = ["StateRecorder", "budget_state"]


class StateRecorder:
    """Keeps a copy of the weights of every model ``metric``'s select set judges (``wrapped`` is the metric to
    give ``factorize``)."""

    def __init__(self, metric: Metric):
        if metric.select is None:
            raise SystemExit("error: per-state numbers need the metric's select set (--metric-decides)")
        self.metric = metric
        self.states: list[tuple[nn.Module, dict]] = []
        self.wrapped = dataclasses.replace(metric, select=self._select)

    def _select(self, model: nn.Module) -> float:
        self.states.append((model, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        return self.metric.select(model)

    def reported(self, trained: nn.Module, judged: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``judged`` (a distillation's ``select`` list, step 0 first) with each state's reported metric added
        (``reported``); ``trained`` is the model that distillation trained."""
        states = [state for model, state in self.states if model is trained]
        if len(states) != len(judged):
            raise RuntimeError(f"{len(states)} states recorded for {len(judged)} judged ones")
        probe = copy.deepcopy(trained)
        out = []
        for entry, state in zip(judged, states):
            probe.load_state_dict(state)
            out.append({**entry, "reported": self.metric(probe)})
        return out


def budget_state(judged: list[dict[str, Any]], seconds: float, metric: Metric) -> dict[str, Any]:
    """The judged state (an entry of ``judged``) a run with a budget of ``seconds`` would have returned: the best
    by the run's criterion among those judged by then, the undistilled one (step 0) unless one is better."""
    criterion = Criterion(SimpleNamespace(metric=metric))  # only its decision rule is used: no checker needed

    def judgement(entry: dict[str, Any]) -> Judgement:
        return Judgement(entry["rel_error"], entry.get("metric"))

    start, best = judged[0], None
    for entry in judged[1:]:
        incumbent = None if best is None else judgement(best)
        if entry["seconds"] <= seconds and criterion.better(judgement(entry), incumbent):
            best = entry
    return best if best is not None and criterion.better(judgement(best), judgement(start)) else start
