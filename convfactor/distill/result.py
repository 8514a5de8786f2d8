"""``factorize(..., distill=...)``: distil the result, measure it before and after on held-out data, keep the better.

    result (factorized) --measure CHECK--> before
        --distill on FIT (or DistillOptions.data), stopped and judged by the Criterion--> distilled
        --measure CHECK--> after
    returned: distilled if the Criterion judges it better than the undistilled result, else the undistilled one
    Criterion (``criterion.py``): the task metric on its select set (``Metric.select``) when given, else the
        SELECT part's output error; the select error is recorded beside the metric either way

The decision never sees the check part or the metric's reported set (``Metric.fn``); both are measured for the
report (before, after) and afterwards by ``verify.check_result`` on the model returned, so
``report.extra['fidelity_check']`` is still the held-out number of what the caller gets.
``report.extra['distill']`` holds both measurements, which criterion decided (``decided_by``), the steps, the
loss, the select judgements and why it stopped; a rejected distillation is said in the report's notes.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ..batches import calibration_batches
from ..errors import ConvfactorError
from ..output_checker import compact_outputs, rounded
from ..progress import say
from .criterion import Criterion
from .training import DistillOptions, as_distill_options, distill_model

__all__ = ["check_distill_request", "distill_result", "distill_summary", "distill_rows", "MAX_DISTILL_SAMPLES"]

# Samples of DistillOptions.data kept at most (a tensor is cut into views; a DataLoader's batches are held).
MAX_DISTILL_SAMPLES = 8192


def check_distill_request(distill: Any, calibration: Any, validation: Any) -> DistillOptions | None:
    """``distill=`` read and checked against the data given, before any expensive work.

    Raises:
        ConvfactorError: not steps or ``DistillOptions``, or no data to distil on or to stop and measure by.
    """
    options = as_distill_options(distill)
    if options is None:
        return None
    if calibration is None and validation is None:
        raise ConvfactorError("distill needs calibration=... or validation=...: their select part stops the "
                              "distillation and their check part measures it (CLI: --calibration INPUTS.pt)")
    if options.data is None and calibration is None:
        raise ConvfactorError("distill needs inputs to distil on: calibration=... (its fit part is used) or "
                              "DistillOptions(data=...) (CLI: --distill-data INPUTS.pt)")
    return options


def _measured(metrics: dict[str, Any]) -> dict[str, Any]:
    """A check measurement as the report keeps it: errors per output, agreement, the metric where given."""
    keep = ("rel_error", "worst", "agreement", "samples", "data", "metric", "metric_original", "metric_drop")
    out = {k: (rounded(metrics[k], 5) if isinstance(metrics[k], float) else metrics[k]) for k in keep if k in metrics}
    out["outputs"] = compact_outputs(metrics["outputs"])
    return out


def _time_left(options: DistillOptions, info: dict[str, Any]) -> float | None:
    if options.time_budget is not None:
        return options.time_budget
    budget = info.get("time_budget")  # AutoOptions.time_budget: what the resolution left of it
    return None if budget is None else max(0.0, budget["seconds"] - budget["used"])


def distill_result(model: nn.Module, result: nn.Module, resolution: Any, options: DistillOptions, report: Any,
                   progress: bool | str = False) -> None:
    """Distil ``result`` (in place) towards ``model``; see the module docstring. Writes ``report.extra['distill']``.

    Args:
        model: the caller's original network (copied as the teacher; never changed).
        result: the factorized network; ends in the distilled state when the criterion judged it better.
        resolution: the ``Resolution`` (its checkers and data split).
        options: ``DistillOptions``.
        report: the ``FactorizeReport`` to write to.
        progress: a progress bar with ETA and the loss.
    """
    select, check, split = resolution.checks.get("select"), resolution.checks.get("check"), resolution.split
    if select is None or check is None:
        raise ConvfactorError("distill needs held-out data to stop and measure on (calibration=... or validation=...)")
    n_inputs = len(select.batches[0])
    if options.data is not None:
        batches = calibration_batches(options.data, n_inputs, MAX_DISTILL_SAMPLES)
        source = "distill data"
    else:
        batches, source = split.fit, "calibration fit part"
    if not batches:
        raise ConvfactorError("distill: no inputs to distil on (the calibration fit part is empty; give "
                              "DistillOptions(data=...), CLI --distill-data)")
    samples = int(sum(len(b[0]) for b in batches))
    teacher = copy.deepcopy(model).eval()
    before = check.measure(result, final=True)
    seconds = _time_left(options, resolution.info)
    criterion = Criterion(select)
    if progress:
        say(f"distill: up to {options.steps} steps of {options.batch_size} on {samples} samples ({source}); "
            f"judged every {options.every} steps by {criterion.why}")
    run = distill_model(result, teacher, batches, select, options, progress=progress, seconds=seconds,
                        criterion=criterion)
    if run.improved:
        after = check.measure(result, final=True)
    elif run.rejected_state is not None:  # measured for the report, then the undistilled state is back
        kept = {k: v.clone() for k, v in result.state_dict().items()}
        result.load_state_dict(run.rejected_state)
        after = check.measure(result, final=True)
        result.load_state_dict(kept)
    else:
        after = before
    start, best = run.start.to_dict(), None if run.best is None else run.best.to_dict()
    record: dict[str, Any] = {
        "options": options.to_dict(), "data": {"source": source, "samples": samples},
        **run.to_dict(),
        "returned": "distilled" if run.improved else "undistilled",
        "select_before": start["rel_error"], "select_after": None if best is None else best["rel_error"],
        "before": _measured(before), "after": _measured(after),
        "time_limit": None if seconds is None else round(seconds, 2),
    }
    if "metric" in start:
        record["select_metric_before"] = start["metric"]
        record["select_metric_after"] = None if best is None else best["metric"]
    if select.metric is not None and criterion.metric is None:
        report.notes.append(f"distill: decided by {criterion.why}")
    if not run.improved:
        record["reason"] = _rejected(record)
        report.notes.append(record["reason"])
    report.extra["distill"] = record


def _rejected(record: dict[str, Any]) -> str:
    """Why the undistilled model is returned, in the decision's own terms."""
    if record["steps_run"] == 0:
        return "distillation ran no step: the undistilled model is returned"
    if record["decided_by"]["criterion"] == "metric":
        name = record["decided_by"]["metric"]
        return (f"distillation did not improve the task metric {name!r} on its select set (best distilled "
                f"{record['select_metric_after']:.4g}, undistilled {record['select_metric_before']:.4g}; select "
                f"error {record['select_after']:.4g} vs {record['select_before']:.4g}): the undistilled model is "
                "returned")
    return (f"distillation did not lower the held-out (select) error (its best select error "
            f"{record['select_after']:.4g} is not below {record['select_before']:.4g}): the undistilled model is "
            "returned")


def distill_summary(record: dict[str, Any]) -> dict[str, Any]:
    """What the CLI summary keeps of ``report.extra['distill']`` (JSON-able)."""
    keep = ("returned", "decided_by", "steps_run", "stopped", "seconds", "select_before", "select_after", "reason")
    out = {k: record.get(k) for k in keep}
    out.update({k: record[k] for k in ("select_metric_before", "select_metric_after") if k in record})
    out["steps"] = record["options"]["steps"]
    out["before"], out["after"] = record["before"], record["after"]
    return out


def distill_rows(summary: dict[str, Any]) -> list[list[str]]:
    """The summary's text rows of a distillation: what was returned and why, and before -> after on check."""
    before, after = summary["before"], summary["after"]
    select = f"select error {summary['select_before']:.4g} -> " + (
        "n/a" if summary["select_after"] is None else f"{summary['select_after']:.4g}")
    decided = summary.get("decided_by") or {"criterion": "select error"}
    if decided["criterion"] == "metric":
        after_metric = summary.get("select_metric_after")
        judged = (f"decided by the task metric {decided['metric']} on its select set: "
                  f"{summary['select_metric_before']:.4g} -> "
                  f"{'n/a' if after_metric is None else f'{after_metric:.4g}'} ({select} beside it)")
    else:
        judged = f"decided by the select part's output error: {select}"
    rows = [["distillation", f"{summary['returned']} model returned: {summary['steps_run']}/{summary['steps']} steps "
                             f"in {summary['seconds']:.1f} s ({summary['stopped']}); {judged}"]]
    text = f"{before['rel_error']:.4g} -> {after['rel_error']:.4g} worst-slice relative"
    if before.get("agreement") is not None and after.get("agreement") is not None:
        text += f", agreement {before['agreement']:.3f} -> {after['agreement']:.3f}"
    if before.get("metric") is not None and after.get("metric") is not None:
        text += f", metric {before['metric']:.4g} -> {after['metric']:.4g}"
    rows.append(["  before -> after", f"{text} on {after['samples']} {after['data']}"])
    if len(after["outputs"]) > 1:
        for old, new in zip(before["outputs"], after["outputs"]):
            rows.append([f"  output {new['name']}",
                         f"{old['rel_error']:.4g} -> {new['rel_error']:.4g} ({new['kind']})"])
    return rows
