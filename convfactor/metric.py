"""The user's task metric: a function that scores a model on the user's own data.

``factorize(..., metric=fn)`` with ``fn(model) -> float`` (accuracy, F-score, CER...). Higher is better
unless the function says otherwise (an attribute ``fn.higher_is_better = False``, or
``Metric(fn, higher_is_better=False)``). The automatic policy evaluates it on the original once, at its
fidelity probes (at most ``AutoOptions.metric_evaluations`` times) and on the result; the policy's
``fidelity: {max_metric_drop: X}`` / ``{min_metric: Y}`` bound it, and the report prints both values.
The data it runs on is the user's: give data no calibration sample came from, so the number is held out.

``Metric(fn, select=fn_select)`` adds the metric on a second, separate labelled set: the one decisions may
be made by (whether a distilled state is kept, ``convfactor.distill.criterion``) while ``fn``'s number stays
the held-out one the report prints. A metric without ``select`` cannot decide there: its one number would
then be both what decided and what is reported.

On the command line ``--metric package.module:function`` or ``--metric path/file.py:function`` names
the function; it is imported because the user named it there, never because a file asks for it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ConvfactorError, one_line

__all__ = ["Metric", "as_metric", "load_metric"]


@dataclass(frozen=True)
class Metric:
    """A task metric: ``fn(model) -> float``, its name for the report, its direction, and optionally the same
    metric on a separate labelled set that decisions may use (``select``)."""

    fn: Callable[[nn.Module], float]
    name: str = "metric"
    higher_is_better: bool = True
    select: Callable[[nn.Module], float] | None = None

    def __post_init__(self):
        if self.select is not None and not callable(self.select):
            raise ConvfactorError(f"metric {self.name!r}: select must be a callable taking a model, got "
                                  f"{type(self.select).__name__}")

    def __call__(self, module: nn.Module) -> float:
        """The metric of ``module`` (in eval mode, without gradients); a non-number is an error naming it."""
        return _evaluate(self.fn, module, self.name)

    def on_select(self, module: nn.Module) -> float:
        """The metric of ``module`` on the select set (``select``); the same checks as ``__call__``."""
        if self.select is None:
            raise ConvfactorError(f"metric {self.name!r} has no select part (Metric(..., select=fn))")
        return _evaluate(self.select, module, f"{self.name} (select)")

    def drop(self, original: float, value: float) -> float:
        """How much worse ``value`` is than ``original`` (positive: worse), in the metric's own units."""
        return original - value if self.higher_is_better else value - original

    def meets(self, value: float, floor: float) -> bool:
        """``value`` at least as good as ``floor`` (>= for higher-is-better, <= otherwise)."""
        return value >= floor if self.higher_is_better else value <= floor


def _evaluate(fn: Callable[[nn.Module], float], module: nn.Module, name: str) -> float:
    """``fn(module)`` in eval mode without gradients, the modules' training flags restored; a number or an error."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            value = fn(module)
    except ConvfactorError:
        raise
    except Exception as error:
        raise ConvfactorError(f"metric {name!r} failed with {type(error).__name__}: {one_line(error)}") from error
    finally:
        for m, training in flags:
            m.training = training
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConvfactorError(f"metric {name!r} must return a finite number, got {value!r}")
    return float(value)


def as_metric(value: Any) -> Metric | None:
    """None, a ``Metric``, or a callable taking a model (its ``higher_is_better`` attribute respected)."""
    if value is None or isinstance(value, Metric):
        return value
    if not callable(value):
        raise ConvfactorError(f"metric must be a callable taking a model and returning a float, got "
                              f"{type(value).__name__}")
    higher = getattr(value, "higher_is_better", True)
    if not isinstance(higher, bool):
        raise ConvfactorError(f"metric {getattr(value, '__name__', value)!r}: higher_is_better must be True or False")
    return Metric(value, getattr(value, "__name__", type(value).__name__), higher)


def load_metric(spec: str, select_spec: str | None = None) -> Metric:
    """The metric ``--metric MODULE:FUNCTION`` names, with ``--select-metric MODULE:FUNCTION`` as its select part
    (imported: the user named them on the command line)."""
    from .files.architecture import import_callable

    fn, _ = import_callable(spec, "--metric", "function")
    metric = as_metric(fn)
    assert metric is not None
    select = None if select_spec is None else import_callable(select_spec, "--select-metric", "function")[0]
    return Metric(metric.fn, spec.rpartition(":")[2], metric.higher_is_better, select)
