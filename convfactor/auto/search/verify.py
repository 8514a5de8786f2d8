"""Measure, don't trust: whole-model checks of an allocation against the original network.

The allocator predicts (per-layer errors times sensitivities, per-layer times); this module measures
the whole candidate network (``convfactor.auto.search.budget_search`` corrects the allocation with it):

  * ``OutputChecker`` (``convfactor.output_checker``): the original's outputs on fixed inputs,
    computed once; a candidate is scored per output and per slice along each output's feature axis, by
    top-1 agreement on outputs declared as class scores, and by the user's task metric where given.
  * ``SpeedMeter``: whole-model speedup in the latency runtime; the original is exported once and its
    ONNX file reused for every candidate (both quantized first when the latency model times int8); a
    short timing decides when the answer is clear (far from the threshold and near what the latency
    model predicted), a full one otherwise.
  * ``check_result``: the final model against the bound (the policy's, else ``DEFAULT_FLOOR``), measured
    on the check samples no fit or selection saw (``convfactor.auto.statistics.split``), beside its in-sample error.

``DEFAULT_FLOOR`` is the bound every automatic result is checked against when the policy gives none:
the report and the CLI show the measured error and warn above it (``--check`` then exits 1). Warnings
say their subject in words and in their class: accuracy (``FidelityWarning``) or speed (``SpeedWarning``).
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...output_checker import OutputChecker, compact_outputs, failures, rounded
from ...policy import Fidelity
from ..latency.int8_timing import quantized_for_timing
from ..latency.model import compare_models

__all__ = ["DEFAULT_FLOOR", "applied_bound", "SpeedMeter", "ConvfactorWarning", "FidelityWarning",
           "SpeedWarning", "categorize", "check_result", "held_out_check", "publish_warnings",
           "describe_metrics"]

# The default floor: a result beyond it is visibly not the original network any more (on the shipped
# digits models a relative logit error above ~0.3 goes with accuracy losses of several points).
DEFAULT_FLOOR = Fidelity(max_rel_error=0.3, min_agreement=0.9)


def describe_metrics(metrics: dict[str, Any]) -> str:
    """'worst-slice relative error 0.031 (logits), top-1 agreement 0.990 on 64 held-out calibration samples'."""
    where = f" ({metrics['worst']})" if metrics.get("worst") else ""
    text = f"worst-slice relative error {_fmt(metrics.get('rel_error'))}{where}"
    if metrics.get("agreement") is not None:
        text += f", top-1 agreement {metrics['agreement']:.3f}"
    return text + f" on {metrics.get('samples')} {metrics.get('data', 'samples')}"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else (f"{value:.4g}" if math.isfinite(value) else str(value))


class SpeedMeter:
    """Whole-model speedups of candidates over one original, the original's export reused.

    With the default onnxruntime comparer the original is exported once; each candidate is timed
    first briefly and again at full length when the short answer is within ``margin`` of ``threshold``
    (speedup), or more than ``2 margin`` off the ``expected`` speedup (the latency model's prediction):
    a short timing that disagrees with the prediction that much is more often noise (a session's
    first runs, another process) than news. Other runtimes and stub comparers go through
    ``model.speedup``.
    """

    def __init__(self, model: Any, root: nn.Module, inputs: tuple[torch.Tensor, ...], margin: float = 0.1):
        self.model = model
        self.root = root
        self.inputs = inputs
        self.margin = margin
        self.seconds = 0.0
        self.calls = 0
        self._scratch: tempfile.TemporaryDirectory | None = None
        self._original: Path | None = None

    def _reusable(self) -> bool:

        return self.model.comparer is compare_models and self.model.options.runtime == "onnxruntime"

    def speedup(self, candidate: nn.Module, threshold: float | None = None, expected: float | None = None) -> float:
        started = time.perf_counter()
        self.calls += 1
        try:
            if not self._reusable():
                return float(self.model.speedup(self.root, candidate, self.inputs))
            try:
                return self._onnxruntime(candidate, threshold, expected)
            except Exception:  # noqa: BLE001 - an export problem: the latency model's own path falls back
                return float(self.model.speedup(self.root, candidate, self.inputs))
        finally:
            self.seconds += time.perf_counter() - started

    def _onnxruntime(self, candidate: nn.Module, threshold: float | None, expected: float | None) -> float:
        from ...runtime.benchmarking import benchmark
        from ...runtime.sessions import prepare_onnx

        options = self.model.options
        if self._original is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="convfactor-verify-")
            prepared = prepare_onnx(self.root, self.inputs, self._scratch.name, "original", exporter=options.exporter)
            self._original = self._as_timed(prepared.path)
        subject: nn.Module | Path = candidate
        if options.int8:  # timed as the int8 graph the deployed model will run, like the original above
            subject = self._as_timed(prepare_onnx(candidate, self.inputs, self._scratch.name,
                                                  f"candidate{self.calls}", exporter=options.exporter).path)

        def run(min_time: float, repeats: int) -> float:
            report = benchmark(self._original, subject, self.inputs, threads=options.threads,
                               graph_optimization=options.graph_optimization, warmup=5, repeats=repeats,
                               min_time=min_time, progress=False, exporter=options.exporter)
            return float(report.results[0].speedup)

        try:
            quick = run(options.verify_min_time / 4, 10)
            near = threshold is None or abs(quick / threshold - 1) < self.margin
            surprising = expected is not None and expected > 0 and abs(quick / expected - 1) > 2 * self.margin
            return run(options.verify_min_time, 30) if near or surprising else quick
        finally:  # a candidate's files are timed once: only the original's stay for the next call
            for path in Path(self._scratch.name).glob(f"candidate{self.calls}*"):
                path.unlink()

    def _as_timed(self, path: Path) -> Path:
        """``path``, or its int8 form (``quantize_onnx``, pre-processed) when the latency model times int8."""
        if not self.model.options.int8:
            return path
        return quantized_for_timing(path, self.inputs, preprocess=True)

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None
            self._original = None


class ConvfactorWarning(UserWarning):
    """Something about a result the caller should know; the subclass says whether it is accuracy or speed."""


class FidelityWarning(ConvfactorWarning):
    """Accuracy: the result may not keep the original's outputs or task metric (see the report's warnings)."""


class SpeedWarning(ConvfactorWarning):
    """Speed or cost: a replacement or the whole result measured slower than hoped, or a target was missed."""


ACCURACY, SPEED = "accuracy", "speed"


def categorize(message: str) -> type[ConvfactorWarning]:
    """The warning class of a report warning, from the subject it starts with ('speed: ...')."""
    return SpeedWarning if message.startswith(SPEED + ":") else FidelityWarning


def held_out_check(checks: dict[str, OutputChecker | None], module: nn.Module, bound: Fidelity | None,
                   spec: Fidelity | None, split: dict[str, Any] | None) -> tuple[dict[str, Any] | None, list[str]]:
    """The returned model measured on the check samples (held out), beside the fit (in-sample) samples.

    Returns the JSON-able record for ``report.extra['fidelity_check']`` and accuracy warnings (words, no
    prefix). The bound is the policy's, else ``DEFAULT_FLOOR`` (with the policy's output declarations).
    """
    check = checks.get("check")
    if check is None:
        return None, ["no fidelity check: no example inputs or calibration data to compare the outputs on"]
    used = applied_bound(bound, spec)
    held = check.measure(module, final=True)
    held.pop("stopped_early", None)
    failed = failures(held, used)
    record: dict[str, Any] = {
        **{k: (rounded(v, 5) if isinstance(v, float) else v) for k, v in held.items() if k != "outputs"},
        "outputs": compact_outputs(held["outputs"]), "held_out": bool(split and split.get("held_out")),
        "bound": used.to_dict(), "bound_text": used.describe(),
        "bound_source": "policy" if bound is not None else "default floor", "passed": not failed}
    messages = []
    fit = checks.get("fit")
    if fit is not None and fit is not check:
        inside = fit.measure(module)
        record["in_sample"] = {"rel_error": rounded(inside["rel_error"], 5), "worst": inside["worst"],
                               "agreement": inside["agreement"], "samples": inside["samples"], "data": inside["data"]}
        ratio = held["rel_error"] / inside["rel_error"] if inside["rel_error"] > 0 else math.inf
        if held["rel_error"] > OVERFIT_RATIO * inside["rel_error"] and held["rel_error"] > OVERFIT_FLOOR:
            record["overfit"] = rounded(ratio, 3)
            messages.append(f"the fit overfits its samples: held-out error {held['rel_error']:.4g} is {ratio:.1f}x the "
                            f"in-sample {inside['rel_error']:.4g} (worst slice {held['worst']}); more or more varied "
                            f"calibration data, or a fidelity bound, would help")
    if failed:
        messages.append(f"accuracy not kept: {'; '.join(failed)} (measured on {held['samples']} {held['data']}; "
                        f"{record['bound_source']}: {used.describe()})")
    if split and not split.get("held_out"):
        messages.append(f"fidelity measured on the samples the factors were fitted to ({held['samples']} "
                        f"{held['data']}): the held-out error is unknown; give at least 32 calibration samples or "
                        f"validation=... (CLI: --validation)")
    return record, messages


OVERFIT_RATIO = 2.0  # held-out error over in-sample error beyond which the fit is said to overfit
OVERFIT_FLOOR = 0.01  # ... when the held-out error is at least this (tiny errors differ by noise)


def applied_bound(bound: Fidelity | None, spec: Fidelity | None) -> Fidelity:
    """The bound a held-out check applies: the policy's, else ``DEFAULT_FLOOR`` with its output declarations."""
    if bound is not None:
        return bound
    if spec is None:
        return DEFAULT_FLOOR
    return Fidelity(DEFAULT_FLOOR.max_rel_error, DEFAULT_FLOOR.min_agreement, reduce=spec.reduce, outputs=spec.outputs)


def publish_warnings(report: Any, accuracy: list[str], speed: list[str], stacklevel: int = 3) -> None:
    """Add warnings to ``report.warnings`` with their subject in words ('accuracy: ...', 'speed: ...') and
    raise each through ``warnings.warn`` in its category (``FidelityWarning`` / ``SpeedWarning``)."""
    import warnings

    for subject, messages in ((ACCURACY, accuracy), (SPEED, speed)):
        for message in messages:
            text = message if message.startswith(subject + ":") else f"{subject}: {message}"
            if text not in report.warnings:
                report.warnings.append(text)
                warnings.warn(text, categorize(text), stacklevel=stacklevel)


def check_result(checks: dict[str, OutputChecker | None], module: nn.Module, report: Any, info: dict[str, Any],
                 bound: Fidelity | None, spec: Fidelity | None = None) -> None:
    """The final model measured on held-out data: ``report.extra['fidelity_check']`` and the warnings.

    Every warning the resolution collected (``info['warnings']``: accuracy, ``info['speed_warnings']``:
    speed) and a failed bound (the policy's, else ``DEFAULT_FLOOR``) go to ``report.warnings`` and
    through ``warnings.warn`` in their category (the CLI prints them on stderr).
    """
    record, messages = held_out_check(checks, module, bound, spec, info.get("data_split"))
    if record is not None:
        report.extra["fidelity_check"] = record
    publish_warnings(report, list(info.get("warnings", [])) + messages, list(info.get("speed_warnings", [])),
                     stacklevel=4)
