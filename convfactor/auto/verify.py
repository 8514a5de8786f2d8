"""Measure, don't trust: whole-model checks of an allocation against the original network.

The allocator predicts (per-layer errors times sensitivities, per-layer times); this module measures
the whole candidate network (``convfactor.auto.budget_search`` corrects the allocation with it):

  * ``OutputChecker``: the original's outputs on the data at hand (calibration inputs, else the example
    inputs), computed once; a candidate is scored by its relative L2 output error and, for [N, C]
    outputs, its top-1 agreement. It stops early once a candidate clearly fails the bound.
  * ``SpeedMeter``: whole-model speedup in the latency runtime; the original is exported once and its
    ONNX file reused for every candidate; a short timing decides when the answer is clear (far from
    the threshold and near what the latency model predicted), a full one otherwise.
  * ``check_result``: the final model against the bound (the policy's, else ``DEFAULT_FLOOR``).

``DEFAULT_FLOOR`` is the bound every automatic result is checked against when the policy gives none:
the report and the CLI show the measured error and warn above it (``--check`` then exits 1).
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..policy import Fidelity
from .calibration import output_leaves

__all__ = ["DEFAULT_FLOOR", "REFERENCE_BYTES", "OutputChecker", "SpeedMeter", "FidelityWarning", "check_result",
           "failures", "describe_metrics", "rounded", "say"]

# The default floor: a result beyond it is visibly not the original network any more (on the shipped
# digits models a relative logit error above ~0.3 goes with accuracy losses of several points).
DEFAULT_FLOOR = Fidelity(max_rel_error=0.3, min_agreement=0.9)
_EARLY_FACTOR = 1.5  # a running error this far beyond the bound after a quarter of the data: stop
REFERENCE_BYTES = 256 * 2**20  # the original's outputs kept for the checks (whole batches; at least one)


def rounded(value: float | None, digits: int = 6) -> float | None:
    """``value`` to ``digits`` significant digits (None, 0 and non-finite values as they are)."""
    if value is None or value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - int(math.floor(math.log10(abs(value)))))



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
            **{k: (rounded(v, 5) if isinstance(v, float) else v) for k, v in metrics.items()},
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
