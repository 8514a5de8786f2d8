"""How a distilled state is judged on held-out data, and the one rule that says which of two states is better.

    criterion "metric":       the task metric on its select set (``Metric.select``: labelled data of the
                              user's that no fit, distillation or final check sees); better = a better
                              metric, a tie broken by the lower select error
    criterion "select error": the worst-slice (or pooled, as declared) relative output error on the select
                              part of the data split (``convfactor.auto.statistics.split``); better = lower

The output error on the select part is measured under both, so it is always shown beside the metric. The
relative output error and a task metric can disagree (a lower error of a whole probability map and worse
boxes after the threshold; a higher error of every softmax step and fewer wrong characters after the CTC
decode): when the user gave the metric, it decides. A metric without a select set does not decide: its only
data are what the final check reports (``Metric.fn``), which would then no longer be held out; the output
error decides and ``why`` says so.

``better`` is the one place the decision is written: the best state during distillation (early stopping),
whether the best distilled state is kept over the undistilled one, and the distilled search probes all call it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..metric import Metric
from ..output_checker import OutputChecker, rounded

__all__ = ["Judgement", "Criterion"]


@dataclass(frozen=True)
class Judgement:
    """One state's held-out numbers: the select part's output error, and the metric on its select set."""

    rel_error: float
    metric: float | None = None

    def to_dict(self) -> dict[str, float]:
        out = {"rel_error": rounded(self.rel_error, 5)}
        if self.metric is not None:
            out["metric"] = rounded(self.metric, 5)
        return out


class Criterion:
    """Judges models on held-out data and decides which of two judgements is better (see the module docstring).

    Args:
        select: the checker of the select part (its ``metric`` is the user's, if any).
        error: how the output error is measured (default: ``select.measure(model)['rel_error']``).
    """

    def __init__(self, select: OutputChecker, error: Callable[[nn.Module], float] | None = None):
        self.checker = select
        self.error = error or (lambda model: float(select.measure(model)["rel_error"]))
        metric: Metric | None = select.metric
        self.metric = metric if metric is not None and metric.select is not None else None
        self.name = "metric" if self.metric is not None else "select error"
        if self.metric is not None:
            self.why = f"the task metric {self.metric.name!r} on its select set (Metric.select)"
        elif metric is not None:
            self.why = (f"the select part's output error: the metric {metric.name!r} has no select set "
                        "(Metric(..., select=fn), CLI --select-metric), and its one set is what the final check "
                        "reports")
        else:
            self.why = "the select part's output error (no task metric given)"

    def judge(self, model: nn.Module) -> Judgement:
        """``model``'s select error, and its metric on the select set when the metric decides."""
        error = float(self.error(model))
        return Judgement(error, None if self.metric is None else self.metric.on_select(model))

    def better(self, candidate: Judgement, incumbent: Judgement | None) -> bool:
        """Whether ``candidate`` is better than ``incumbent`` (None: nothing yet, so yes). The one decision rule."""
        if incumbent is None:
            return True
        if self.metric is not None and candidate.metric is not None and incumbent.metric is not None:
            drop = self.metric.drop(incumbent.metric, candidate.metric)  # positive: the candidate is worse
            if drop != 0:
                return drop < 0
        return candidate.rel_error < incumbent.rel_error

    def describe(self) -> dict[str, Any]:
        """For the report: which criterion decided, and why that one."""
        out: dict[str, Any] = {"criterion": self.name, "why": self.why}
        if self.metric is not None:
            out.update(metric=self.metric.name, higher_is_better=self.metric.higher_is_better)
        return out
