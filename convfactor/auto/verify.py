"""Measure, don't trust: whole-model checks of an allocation against the original network.

The allocator predicts (per-layer errors times sensitivities, per-layer times); this module measures
the whole candidate network and corrects the allocation by measurement:

  * ``OutputChecker``: the original's outputs on the data at hand (calibration inputs, else the example
    inputs), computed once; a candidate is scored by its relative L2 output error and, for [N, C]
    outputs, its top-1 agreement. It stops early once a candidate clearly fails the bound.
  * ``SpeedMeter``: whole-model speedup in the latency runtime; the original is exported once and its
    ONNX file reused for every candidate; a short timing decides when the answer is clear (far from
    the threshold and near what the latency model predicted), a full one otherwise.
  * ``search_budget``: the budget (a fraction of the original cost) is corrected by measurement: for a
    latency target, secant steps on the measured time until it is at most the request and at most
    ``SPEED_TOLERANCE`` faster; then, with a fidelity bound, bisection towards a larger budget until the measured
    error holds (the cheapest budget that does). A target the bound does not allow is reported missed,
    with the measured shortfall; the model returned always holds the bound.

``DEFAULT_FLOOR`` is the bound every automatic result is checked against when the policy gives none:
the report and the CLI show the measured error and warn above it (``--check`` then exits 1).
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..policy import Fidelity
from .calibration import output_leaves
from .deadline import Deadline

__all__ = ["DEFAULT_FLOOR", "SPEED_TOLERANCE", "OutputChecker", "SpeedMeter", "Probe", "SearchResult",
           "search_budget", "failures", "describe_metrics"]

# The default floor: a result beyond it is visibly not the original network any more (on the shipped
# digits models a relative logit error above ~0.3 goes with accuracy losses of several points).
DEFAULT_FLOOR = Fidelity(max_rel_error=0.3, min_agreement=0.9)
SPEED_TOLERANCE = 0.05  # a latency target is met when the measured speedup is >= (1 - this) x the request
_EARLY_FACTOR = 1.5  # a running error this far beyond the bound after a quarter of the data: stop
REFERENCE_BYTES = 256 * 2**20  # the original's outputs kept for the checks (whole batches; at least one)


def failures(metrics: dict[str, Any], bound: Fidelity) -> list[str]:
    """The bound's criteria ``metrics`` fails, as short phrases (empty: it holds)."""
    out = []
    error = metrics.get("rel_error")
    if bound.max_rel_error is not None and (error is None or not error <= bound.max_rel_error):
        out.append(f"relative output error {_fmt(error)} > {bound.max_rel_error:g}")
    agreement = metrics.get("agreement")
    if bound.min_agreement is not None and agreement is not None and agreement < bound.min_agreement:
        out.append(f"top-1 agreement {agreement:.4f} < {bound.min_agreement:g}")
    return out


def describe_metrics(metrics: dict[str, Any]) -> str:
    """'relative output error 0.031, top-1 agreement 0.990 on 256 calibration samples'."""
    text = f"relative output error {_fmt(metrics.get('rel_error'))}"
    if metrics.get("agreement") is not None:
        text += f", top-1 agreement {metrics['agreement']:.3f}"
    return text + f" on {metrics.get('samples')} {metrics.get('data', 'samples')}"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else (f"{value:.4g}" if math.isfinite(value) else str(value))


def _leaves(outputs: Any) -> list[torch.Tensor]:
    return [t.to(torch.float64) for t in output_leaves(outputs)]


class OutputChecker:
    """The original network's outputs on fixed inputs, and candidates' errors against them.

    Args:
        root: the original (BatchNorm-folded) network, in eval mode; not modified.
        batches: list of input tuples (the calibration batches, or the example inputs as one batch).
        data: how the report names the inputs ("calibration samples", "example inputs").
        outputs: the original's ``output_leaves`` on the first batches, when already computed.
    """

    def __init__(self, root: nn.Module, batches: Sequence[tuple[torch.Tensor, ...]], data: str,
                 outputs: Sequence[list[torch.Tensor]] | None = None):
        self.batches = list(batches)
        self.data = data
        self.samples = int(sum(len(b[0]) for b in self.batches))
        self.seconds = 0.0
        self.calls = 0
        started = time.perf_counter()
        self.reference: list[list[torch.Tensor]] = []
        kept = 0
        known = list(outputs or [])
        for index, batch in enumerate(self.batches):  # float32 references, at most REFERENCE_BYTES of them
            leaves = known[index] if index < len(known) else self._run(root, batch)
            outputs = [t.float() for t in leaves]
            if self.reference and kept + sum(t.numel() * 4 for t in outputs) > REFERENCE_BYTES:
                break
            self.reference.append(outputs)
            kept += sum(t.numel() * 4 for t in outputs)
        self.batches = self.batches[:len(self.reference)]
        self.samples = int(sum(len(b[0]) for b in self.batches))
        self.seconds += time.perf_counter() - started

    def reference_for(self, batches: Sequence[tuple[torch.Tensor, ...]]) -> list[list[torch.Tensor]] | None:
        """The original's outputs on ``batches`` when they are a prefix of the checker's (a last batch cut
        short included, for outputs with a batch axis); else None."""
        if len(batches) > len(self.reference):
            return None
        out = []
        for batch, mine, reference in zip(batches, self.batches, self.reference):
            size, full = len(batch[0]), len(mine[0])
            if size == full:
                out.append(reference)
            elif size < full and all(t.dim() > 0 and t.shape[0] == full for t in reference) \
                    and all(torch.equal(a, b[:size]) for a, b in zip(batch, mine)):
                out.append([t[:size] for t in reference])
            else:
                return None
        return out

    @staticmethod
    @torch.no_grad()
    def _run(module: nn.Module, batch: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        return _leaves(module(*batch))

    def measure(self, module: nn.Module, bound: Fidelity | None = None) -> dict[str, Any]:
        """{rel_error, agreement (None when no output is [N, C]), samples, data, stopped_early}.

        With ``bound``, measuring stops once a quarter of the samples have run and the running error
        is beyond 1.5x the bound (the answer is clear); ``samples`` then counts those measured.
        """
        started = time.perf_counter()
        self.calls += 1
        err2 = ref2 = 0.0
        agree = count = seen = 0
        stopped = False
        for batch, reference in zip(self.batches, self.reference):
            outputs = self._run(module, batch)
            if len(outputs) != len(reference):
                raise ValueError(f"the candidate returns {len(outputs)} output(s), the original {len(reference)}")
            for a, b in zip(reference, outputs):
                a = a.double()
                if not torch.isfinite(b).all():
                    err2 = math.inf
                    continue
                err2 += float(((a - b) ** 2).sum())
                ref2 += float((a ** 2).sum())
                if a.dim() == 2 and a.shape[1] >= 2:
                    agree += int((a.argmax(1) == b.argmax(1)).sum())
                    count += a.shape[0]
            seen += len(batch[0])
            if bound is not None and seen * 4 >= self.samples and seen < self.samples:
                partial = self._metrics(err2, ref2, agree, count, seen)
                loose = Fidelity(None if bound.max_rel_error is None else bound.max_rel_error * _EARLY_FACTOR,
                                 None if bound.min_agreement is None
                                 else 1 - (1 - bound.min_agreement) * _EARLY_FACTOR)
                if failures(partial, loose):
                    stopped = True
                    break
        self.seconds += time.perf_counter() - started
        out = self._metrics(err2, ref2, agree, count, seen)
        out["stopped_early"] = stopped
        return out

    def _metrics(self, err2: float, ref2: float, agree: int, count: int, seen: int) -> dict[str, Any]:
        if ref2 > 0:
            rel = math.sqrt(err2 / ref2)
        else:
            rel = 0.0 if err2 == 0 else math.inf
        return {"rel_error": rel, "agreement": agree / count if count else None, "samples": seen,
                "data": self.data}


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
        from .latency import compare_models

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
        from ..runtime.benchmarking import benchmark
        from ..runtime.sessions import prepare_onnx

        options = self.model.options
        if self._original is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="convfactor-verify-")
            prepared = prepare_onnx(self.root, self.inputs, self._scratch.name, "original", exporter=options.exporter)
            self._original = prepared.path

        def run(min_time: float, repeats: int) -> float:
            report = benchmark(self._original, candidate, self.inputs, threads=options.threads,
                               graph_optimization=options.graph_optimization, warmup=5, repeats=repeats,
                               min_time=min_time, progress=False, exporter=options.exporter)
            return float(report.results[0].speedup)

        quick = run(options.verify_min_time / 4, 10)
        near = threshold is None or abs(quick / threshold - 1) < self.margin
        surprising = expected is not None and expected > 0 and abs(quick / expected - 1) > 2 * self.margin
        if near or surprising:
            return run(options.verify_min_time, 30)
        return quick

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None
            self._original = None


@dataclass
class Probe:
    """One measured allocation: the budget it was allocated at, its cost and its measured fidelity."""

    budget: float  # fraction of the original the allocator was given
    fraction: float  # cost of the result as a fraction of the original (measured for latency)
    measured: bool  # fraction is a measurement (latency) rather than an exact count
    metrics: dict[str, Any] | None = None
    ok: bool = True  # holds the fidelity bound (True when there is none)

    def to_dict(self) -> dict[str, Any]:
        out = {"budget": round(self.budget, 5), "fraction": round(self.fraction, 5), "measured": self.measured,
               "fidelity_ok": self.ok}
        if self.metrics is not None:
            out["rel_error"] = _round(self.metrics["rel_error"])
            if self.metrics.get("agreement") is not None:
                out["agreement"] = round(self.metrics["agreement"], 4)
        return out


@dataclass
class SearchResult:
    """The budget chosen, its probe, every probe made, and whether the target was missed (and by how much)."""

    budget: float
    probe: Probe
    probes: list[Probe] = field(default_factory=list)
    missed: dict[str, Any] | None = None


def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value) or value == 0:
        return value
    return round(value, 4 - int(math.floor(math.log10(abs(value)))))


def search_budget(trial: Callable[[float, bool], Probe], *, kind: str, target: float | None, lowest: float,
                  bound: Fidelity | None, rounds: int = 7, speed_rounds: int = 8,
                  deadline: Deadline | None = None) -> SearchResult:
    """The budget whose allocation meets the target as measured and holds ``bound``; see the module doc.

    Args:
        trial: (budget fraction, measure speed) -> Probe of the allocation at that budget.
        kind: "macs", "params" (exact costs) or "latency" (measured).
        target: the requested fraction of the original cost; None: as cheap as ``bound`` allows.
        lowest: the smallest budget fraction the allocator can meet.
        bound: the fidelity bound; None: only the target is corrected.
        rounds: bisection steps for the fidelity bound.
        speed_rounds: whole-model timings to correct a latency target.
        deadline: the time budget: once spent, no further correction or bisection round starts (the
            best budget measured so far is kept; without one that holds the bound, the original side).
    """
    probes: list[Probe] = []

    def run(budget: float, speed: bool) -> Probe:
        probe = trial(min(max(budget, lowest), 1.0), speed)
        probes.append(probe)
        return probe

    start = lowest if target is None else max(target, lowest)
    if kind == "latency" and target is not None:
        best = _fit_speed(run, target, lowest, speed_rounds, deadline)
    else:
        best = run(start, False)
    result = SearchResult(best.budget, best, probes)
    if kind == "latency" and target is not None and best.fraction > target / (1 - SPEED_TOLERANCE):
        result.missed = missed_target(kind, target, best, "the latency model cannot reach it on this runtime")
    if bound is None or best.ok:
        return result
    # Fidelity: more budget, less error. Bisect between the failing budget and the original (error 0).
    failing, holding, kept = best.budget, 1.0, None
    for done in range(rounds):
        if holding - failing < 1e-3:
            break
        if deadline is not None and deadline.spent():
            deadline.cut("fidelity bisection", f"stopped after {done} of {rounds} rounds (the cheapest budget "
                         "measured within the bound so far is kept)")
            break
        middle = (failing + holding) / 2
        probe = run(middle, False)
        if probe.ok:
            holding, kept = middle, probe
        else:
            failing = middle
    if kept is None:
        kept = run(1.0, False)
    if kind == "latency":
        kept = trial(kept.budget, True)  # the time of the model actually returned, for the report
        probes.append(kept)
    result.budget, result.probe = kept.budget, kept
    if target is not None:
        why = "the fidelity bound " + ", ".join(f"{k} {v:g}" for k, v in bound.to_dict().items())
        result.missed = missed_target(kind, target, kept, f"{why} does not hold at the target "
                                f"({'; '.join(failures(best.metrics or {}, bound))})")
    return result


def _fit_speed(run: Callable[[float, bool], Probe], target: float, lowest: float, rounds: int,
               deadline: Deadline | None = None) -> Probe:
    """Regula falsi on the measured time fraction until it lands in ``[target (1 - tol), target]``.

    The window sits on the fast side of the request: a later, independent timing scatters by a few
    percent, and a result accepted at the slow edge of the tolerance (``target / (1 - tol)``) reads as
    a miss there. Steps aim at the middle of the window.

    The budget axis is the latency model's prediction, and the whole graph can run quite differently
    (fusion, overheads, a total measured under other load): the measured fraction is only monotone in
    the budget. Steps interpolate between the closest budgets measured to meet and to miss the
    target; the original (budget 1, fraction 1) is the upper anchor until a miss is measured, and a
    step with nothing measured to meet it yet follows the secant of the last two probes (the first
    assumes time moves one for one with the budget). Each step stays inside the bracket, at least 5% of
    its width from either end, and moves by at most a factor of 2.
    Returned: the largest budget measured to meet the target (least cut, least error); else the one
    within tolerance of it; else the fastest measured.
    """
    accept = target / (1 - SPEED_TOLERANCE)
    aim = target * (1 - SPEED_TOLERANCE / 2)
    budget = max(target, lowest)
    met: Probe | None = None  # the largest budget measured at or below the target
    missed: Probe | None = None  # the smallest budget measured above it
    history: list[Probe] = []
    for done in range(max(rounds, 1)):
        if done and deadline is not None and deadline.spent():
            deadline.cut("latency correction", f"stopped after {done} of {rounds} whole-model timings")
            break
        probe = run(budget, True)
        history.append(probe)
        if probe.fraction <= target:
            if met is None or probe.budget > met.budget:
                met = probe
            if probe.fraction >= target * (1 - SPEED_TOLERANCE):
                break  # landed: at most the target, at most the tolerance faster
        elif missed is None or probe.budget < missed.budget:
            missed = probe
        high_b, high_m = (missed.budget, missed.fraction) if missed is not None else (1.0, 1.0)
        if met is not None:
            low_b = met.budget
            span = high_m - met.fraction
            following = low_b + (aim - met.fraction) * (high_b - low_b) / span if span > 1e-9 else low_b
        else:
            low_b = lowest
            following = probe.budget + (aim - probe.fraction)
            if len(history) >= 2:
                a, b = history[-2], history[-1]
                slope = (b.fraction - a.fraction) / (b.budget - a.budget) if b.budget != a.budget else 0.0
                if slope > 1e-6:
                    following = b.budget + (aim - b.fraction) / slope
        # A noisy timing must not throw the budget to an extreme: at most a factor of 2 per step.
        following = min(max(following, probe.budget / 2), probe.budget * 2)
        # Inside the bracket by 5% of its width (so it shrinks every step): clamped, not bisected, since
        # the upper end is often the original itself (budget 1) and its middle is far from any answer.
        margin = 0.05 * (high_b - low_b)
        following = min(max(following, low_b + margin), high_b - margin)
        following = min(max(following, lowest), 1.0)
        if high_b - low_b < 2e-3 or abs(following - probe.budget) < 1e-3 \
                or (missed is not None and probe.budget <= lowest):
            break
        budget = following
    if met is not None:
        return met
    close = [p for p in history if p.fraction <= accept]
    if close:
        return max(close, key=lambda p: p.budget)
    return min(history, key=lambda p: p.fraction)


def missed_target(kind: str, target: float, probe: Probe, why: str) -> dict[str, Any]:
    what = {"macs": "MACs", "params": "parameters", "latency": "time"}[kind]
    text = f"target {kind} {target:g} missed: the result costs {probe.fraction:.3f} of the original {what}"
    if kind == "latency":
        requested, reached = 1 / target, 1 / probe.fraction
        short = 1 - reached / requested
        text = (f"target latency {target:g} ({requested:.2f}x) missed: measured {reached:.2f}x "
                f"({probe.fraction:.3f} of the original time), {100 * short:.1f}% short")
    else:
        short = probe.fraction - target
        text += f" ({short:+.3f})"
    return {"kind": kind, "target": target, "reached": round(probe.fraction, 4), "shortfall": round(short, 4),
            "message": f"{text}; {why}"}


def progress_line(checks: dict[str, list], total: float) -> str:
    """'verify: 6 fidelity checks 0.8 s, 3 whole-model timings 7.1 s (38% of 20.9 s)'."""
    (f_calls, f_seconds), (t_calls, t_seconds) = checks["fidelity"], checks["latency"]
    b_calls, b_seconds = checks.get("builds", (0, 0.0))
    parts = [f"{f_calls} fidelity checks {f_seconds:.1f} s"] if f_calls else []
    parts += [f"{t_calls} whole-model timings {t_seconds:.1f} s"] if t_calls else []
    parts += [f"{b_calls} candidate models built {b_seconds:.1f} s"] if b_calls and b_seconds >= 0.05 else []
    whole = checks.get("total_seconds", f_seconds + t_seconds)  # with allocations and candidate builds
    other = whole - f_seconds - t_seconds - b_seconds
    parts += [f"allocations {other:.1f} s"] if other >= 0.05 else []
    share = f" ({100 * whole / total:.0f}% of {total:.1f} s)" if total > 0 else ""
    return "verify: " + (", ".join(parts) or "nothing measured") + share


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class FidelityWarning(UserWarning):
    """An automatic result that may not keep the original's accuracy (see the report's warnings)."""


def check_result(checker: OutputChecker | None, module: nn.Module, report: Any, info: dict[str, Any],
                 bound: Fidelity | None) -> None:
    """The default floor: measure the final model, record it in ``report.extra['fidelity_check']``, warn.

    Every warning the resolution collected and a failed bound (the policy's, else ``DEFAULT_FLOOR``) go
    to ``report.warnings`` and through ``warnings.warn`` (the CLI prints them on stderr).
    """
    import warnings

    messages = list(info.get("warnings", []))
    if checker is None:
        messages.append("no fidelity check: no example inputs or calibration data to compare the outputs on")
    else:
        used = bound if bound is not None else DEFAULT_FLOOR
        metrics = checker.measure(module)
        metrics.pop("stopped_early", None)
        failed = failures(metrics, used)
        report.extra["fidelity_check"] = {
            **{k: (_round(v) if isinstance(v, float) else v) for k, v in metrics.items()},
            "bound": used.to_dict(), "bound_source": "policy" if bound is not None else "default floor",
            "passed": not failed}
        if failed:
            messages.append(f"the factorized model is far from the original: {'; '.join(failed)} (measured on "
                            f"{metrics['samples']} {metrics['data']}; "
                            f"{'policy fidelity bound' if bound is not None else 'default floor'})")
    for message in messages:
        if message not in report.warnings:
            report.warnings.append(message)
            warnings.warn(message, FidelityWarning, stacklevel=3)
