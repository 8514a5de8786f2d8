"""``factorize``'s arguments checked before any pass runs, and its account of a run that replaced nothing.

The CLI calls ``factorize`` too, so these checks are the command line's as well (one code path): the
model's weights are finite, the example inputs run through it, calibration and held-out validation
data fit it (``convfactor.input_checks``), every ``leaf_modules`` entry names a module of the model, and
``latency=`` holds only known keys. Each failure is a one-line ``ConvfactorError`` naming the argument.
"""

from __future__ import annotations

import difflib
import inspect
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import ConvfactorError
from .fidelity_spec import is_number
from .input_checks import check_example_inputs, check_inputs

__all__ = ["check_factorize_arguments", "check_leaf_modules", "nothing_replaced_reason"]

# AutoOptions' counts and the least each may be (0 evaluations of the metric: the search judges by output
# error alone; 0 rounds: no bisection; workers None: 1).
AUTO_COUNTS = {"max_samples": 1, "max_rows": 1, "sensitivity_samples": 1, "bins": 1, "fidelity_samples": 1,
               "fidelity_rounds": 0, "metric_evaluations": 0, "workers": 1}


def check_factorize_arguments(model: nn.Module, inputs: Sequence[torch.Tensor] | None, *, calibration: Any,
                              validation: Any = None,
                              leaf_modules: Iterable[str | type], latency: Mapping[str, Any] | None,
                              concrete_args: Mapping[str, Any] | None = None, auto_options: Any = None,
                              input_flag: str | None = None) -> list[str]:
    """Check what ``factorize`` was given against ``model`` (a copy in eval mode); returns notes for the report.

    Args:
        concrete_args: non-tensor ``forward`` arguments, passed when the model is run on the inputs.
        input_flag: how messages name the example inputs (the CLI passes ``--input-shape``).
    Raises:
        ConvfactorError: non-finite weights, example inputs the model cannot take, calibration or validation
            data that does not fit, a leaf module that names nothing, an unknown ``latency`` key.
    """
    from .auto.latency.options import LatencyOptions
    from .files.checkpoint import check_finite

    check_finite(model, "model")
    _check_plain_arguments(model, concrete_args, auto_options)
    if latency is not None:
        LatencyOptions.from_any(latency)  # unknown keys and bad values, before minutes of work
    check_leaf_modules(model, leaf_modules)
    notes = []
    if inputs is not None:
        check_example_inputs(model, inputs, flag=input_flag, kwargs=concrete_args)
    for argument, data in (("calibration", calibration), ("validation", validation)):
        if data is not None:
            found = check_inputs(model, data, argument=argument, example_inputs=inputs, kwargs=concrete_args)
            if found.note:
                notes.append(found.note)
    return notes


def _check_plain_arguments(model: nn.Module, concrete_args: Any, auto_options: Any) -> None:
    """The arguments of plain types: a mapping of ``forward``'s own argument names, an ``AutoOptions`` with a
    positive memory budget."""
    from .auto import AutoOptions

    if concrete_args is not None:
        if not isinstance(concrete_args, Mapping):
            raise ConvfactorError(f"concrete_args: expected a mapping of forward's argument names to values, e.g. "
                                  f"{{'embed': False}}, got {type(concrete_args).__name__}")
        try:
            names = list(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):  # a builtin or C forward: nothing to compare with
            names = None
        unknown = [k for k in concrete_args if names is not None and k not in names]
        if unknown and not any(inspect.signature(model.forward).parameters[n].kind == inspect.Parameter.VAR_KEYWORD
                               for n in names):
            raise ConvfactorError(f"concrete_args: {unknown[0]!r} is not an argument of "
                                  f"{type(model).__name__}.forward (its arguments: {', '.join(names) or 'none'})")
    if auto_options is not None and not isinstance(auto_options, AutoOptions):
        raise ConvfactorError(f"auto_options: expected convfactor.auto.AutoOptions(...), got "
                              f"{type(auto_options).__name__}")
    if auto_options is not None:
        _check_auto_options(auto_options)


def _check_auto_options(opts: Any) -> None:
    """The memory budget and the ridge are positive (a ridge of 0 leaves a rank-deficient covariance
    unsolvable, a negative one makes the fit nonsense); the counts whole numbers of at least ``AUTO_COUNTS``;
    the rank fractions a non-empty sequence in (0, 1]."""
    if opts.memory_budget is not None and (not is_number(opts.memory_budget) or opts.memory_budget <= 0):
        raise ConvfactorError(f"auto_options.memory_budget: expected a positive number of bytes, got "
                              f"{opts.memory_budget!r}")
    for name, least in AUTO_COUNTS.items():
        value = getattr(opts, name)
        if value is None and name == "workers":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ConvfactorError(f"auto_options.{name}: expected a whole number >= {least}, got {value!r}")
    if not is_number(opts.damping) or opts.damping <= 0:
        raise ConvfactorError(f"auto_options.damping: expected a positive number (the ridge relative to the mean "
                              f"input variance, default 0.01), got {opts.damping!r}")
    fractions = opts.fractions
    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Sequence) or not fractions or \
            not all(is_number(f) and 0 < f <= 1 for f in fractions):
        raise ConvfactorError(f"auto_options.fractions: expected a non-empty list or tuple of rank fractions in "
                              f"(0, 1], got {fractions!r}")


def check_leaf_modules(model: nn.Module, leaf_modules: Iterable[str | type], *, flag: str = "leaf_modules") -> None:
    """Every entry names a module of ``model``: its qualified name, its class name, or a class it is an instance of.

    An entry matching nothing is a typo (torch.fx would then trace into the module it meant, or fail
    there), so it is an error naming the closest names rather than a silent no-op.

    Raises:
        ConvfactorError: an entry that matches no module, with the closest known names.
    """
    if isinstance(leaf_modules, (str, type)) or not isinstance(leaf_modules, Iterable):
        raise ConvfactorError(f"{flag}: expected a list of module names, class names or classes, e.g. "
                              f"['backbone.attn'], got {type(leaf_modules).__name__} {leaf_modules!r}")
    modules = list(model.named_modules())
    names = {name for name, _ in modules if name} | {type(m).__name__ for _, m in modules}
    for entry in leaf_modules:
        if isinstance(entry, type):
            if not any(isinstance(m, entry) for _, m in modules):
                raise ConvfactorError(f"{flag}: no module of the model is a {entry.__name__}")
            continue
        if not isinstance(entry, str):
            raise ConvfactorError(f"{flag}: expected module names, class names or classes, got "
                                  f"{type(entry).__name__}")
        if entry not in names:
            close = difflib.get_close_matches(entry, sorted(names), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else \
                f" (module names look like {', '.join(sorted(n for n, _ in modules if n)[:3]) or 'nothing'})"
            raise ConvfactorError(f"{flag}: {entry!r} is neither a module name nor a class name of the model{hint}")


def nothing_replaced_reason(report: Any) -> str | None:
    """Why a report replaced no layer (the reasons of its rows, grouped), or None when something was replaced."""
    if report.replaced:
        return None
    by_reason: dict[str, list[str]] = {}
    for decision in report.layers:
        by_reason.setdefault(decision.reason or decision.status, []).append(decision.name)
    parts = []
    for reason, names in by_reason.items():
        shown = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
        parts.append(f"{shown}: {reason}")
    return "nothing was replaced: " + "; ".join(parts)
