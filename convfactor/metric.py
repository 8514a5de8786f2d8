"""The user's task metric: a function that scores a model on the user's own data.

``factorize(..., metric=fn)`` with ``fn(model) -> float`` (accuracy, F-score, CER...). Higher is better
unless the function says otherwise (an attribute ``fn.higher_is_better = False``, or
``Metric(fn, higher_is_better=False)``). The automatic policy evaluates it on the original once, at its
fidelity probes (at most ``AutoOptions.metric_evaluations`` times) and on the result; the policy's
``fidelity: {max_metric_drop: X}`` / ``{min_metric: Y}`` bound it, and the report prints both values.
The data it runs on is the user's: give data no calibration sample came from, so the number is held out.

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
    """A task metric: ``fn(model) -> float``, its name for the report, and its direction."""

    fn: Callable[[nn.Module], float]
    name: str = "metric"
    higher_is_better: bool = True

    def __call__(self, module: nn.Module) -> float:
        """The metric of ``module`` (in eval mode, without gradients); a non-number is an error naming it."""
        flags = [(m, m.training) for m in module.modules()]
        module.eval()
        try:
            with torch.no_grad():
                value = self.fn(module)
        except ConvfactorError:
            raise
        except Exception as error:
            raise ConvfactorError(f"metric {self.name!r} failed with {type(error).__name__}: "
                                  f"{one_line(error)}") from error
        finally:
            for m, training in flags:
                m.training = training
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ConvfactorError(f"metric {self.name!r} must return a finite number, got {value!r}")
        return float(value)

    def drop(self, original: float, value: float) -> float:
        """How much worse ``value`` is than ``original`` (positive: worse), in the metric's own units."""
        return original - value if self.higher_is_better else value - original

    def meets(self, value: float, floor: float) -> bool:
        """``value`` at least as good as ``floor`` (>= for higher-is-better, <= otherwise)."""
        return value >= floor if self.higher_is_better else value <= floor


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


def load_metric(spec: str) -> Metric:
    """The metric ``--metric MODULE:FUNCTION`` names (imported: the user named it on the command line)."""
    from .files.architecture import import_callable

    fn, _ = import_callable(spec, "--metric", "function")
    metric = as_metric(fn)
    assert metric is not None
    return Metric(metric.fn, spec.rpartition(":")[2], metric.higher_is_better)
