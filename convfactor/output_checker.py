"""The original network's outputs on fixed inputs, and a candidate's errors against them, per output slice.

An ``OutputChecker`` runs the original once on its batches and keeps its outputs (within
``REFERENCE_BYTES``). ``measure`` runs a candidate on the same batches and reduces the errors with
``convfactor.output_error``: every output and every slice along its feature axis on its own scale, so
the bound holds for the worst slice (or pooled, as the policy says); top-1 agreement only on outputs
declared as class scores. With a task metric (``convfactor.metric``), a measurement that a bound needs
also evaluates it, at most ``metric_limit`` times per checker (the final check always may).

The automatic policy keeps three: one on the fit samples (in-sample, for comparison and for the
sensitivity probes' references), one on the select samples (the search decides by it) and one on the
check samples (the held-out number reported; ``convfactor.auto.statistics.split``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .batches import output_leaves
from .errors import PolicyError
from .fidelity_spec import Fidelity
from .metric import Metric
from .output_error import ErrorAccumulator, output_names, plan_layouts

__all__ = ["OutputChecker", "REFERENCE_BYTES", "EARLY_FACTOR", "failures", "rounded", "compact_outputs"]

REFERENCE_BYTES = 256 * 2**20  # the original's outputs kept for the checks (whole batches; at least one)
EARLY_FACTOR = 1.5  # a running error this far beyond the bound after a quarter of the data: stop


def failures(metrics: dict[str, Any], bound: Fidelity) -> list[str]:
    """The bound's criteria ``metrics`` fails, as short phrases naming the worst slice (empty: it holds)."""
    out = []
    error = metrics.get("rel_error")
    if bound.max_rel_error is not None and (error is None or not error <= bound.max_rel_error):
        where = f" ({metrics['worst']})" if metrics.get("worst") and metrics.get("reduce", "worst") == "worst" else ""
        what = "relative output error" if metrics.get("reduce", "worst") == "pooled" else "worst-slice relative error"
        out.append(f"{what} {_fmt(error)}{where} > {bound.max_rel_error:g}")
    agreement = metrics.get("agreement")
    if bound.min_agreement is not None and agreement is not None and agreement < bound.min_agreement:
        out.append(f"top-1 agreement {agreement:.4f} < {bound.min_agreement:g}")
    if "metric" in metrics:
        name, value, drop = metrics.get("metric_name", "metric"), metrics["metric"], metrics.get("metric_drop")
        if bound.max_metric_drop is not None and drop is not None and not drop <= bound.max_metric_drop:
            out.append(f"{name} {value:.4g} vs {metrics['metric_original']:.4g} for the original: drop {drop:.4g} > "
                       f"{bound.max_metric_drop:g}")
        if bound.min_metric is not None:
            higher = metrics.get("metric_higher_is_better", True)
            if not (value >= bound.min_metric if higher else value <= bound.min_metric):
                out.append(f"{name} {value:.4g} {'<' if higher else '>'} {bound.min_metric:g}")
    return out


def rounded(value: float | None, digits: int = 6) -> float | None:
    """``value`` to ``digits`` significant digits (None, 0 and non-finite values as they are)."""
    if value is None or value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - int(math.floor(math.log10(abs(value)))))



def compact_outputs(outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per output: its error, its worst slice and that slice's error, and agreement where declared."""
    rows = []
    for entry in outputs:
        worst = max(entry["slices"], key=lambda r: r["rel_error"])
        row = {"name": entry["name"], "kind": entry["kind"], "rel_error": rounded(entry["rel_error"], 5),
               "slices": len(entry["slices"]), "worst_slice": worst["slice"],
               "worst_slice_error": rounded(worst["rel_error"], 5)}
        if "agreement" in entry:
            row["agreement"] = round(entry["agreement"], 4)
        rows.append(row)
    return rows


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else (f"{value:.4g}" if math.isfinite(value) else str(value))


class OutputChecker:
    """The original network's outputs on fixed inputs, and candidates' errors against them.

    Args:
        root: the original (BatchNorm-folded) network, in eval mode; not modified.
        batches: list of input tuples.
        data: how the report names the inputs ("held-out calibration samples", "example inputs").
        outputs: the original's ``output_leaves`` on the first batches, when already computed.
        spec: the policy's fidelity (declared output kinds and slices, the reduction); None: defaults.
        metric: the user's task metric, evaluated where a bound needs it.
        metric_limit: evaluations of the metric allowed to ``measure`` calls (``final=True`` ones excepted).
        metric_original: the original's metric when already evaluated (by another checker); else it is
            evaluated here, now: ``root`` is the network the pipeline goes on to rewrite in place.
    Raises:
        PolicyError: a declared output slice or axis does not fit the model's outputs.
    """

    def __init__(self, root: nn.Module, batches: Sequence[tuple[torch.Tensor, ...]], data: str,
                 outputs: Sequence[list[torch.Tensor]] | None = None, *, spec: Fidelity | None = None,
                 metric: Metric | None = None, metric_limit: int = 12, metric_original: float | None = None):
        self.root = root
        self.batches = list(batches)
        self.data = data
        self.spec = spec or Fidelity()
        self.metric = metric
        self.metric_limit = metric_limit
        self.metric_calls = 0
        self.metric_original = metric_original if metric is not None else None
        if metric is not None and metric_original is None:
            self.metric_original = metric(root)
        self.seconds = 0.0
        self.calls = 0
        started = time.perf_counter()
        self.reference: list[list[torch.Tensor]] = []
        kept = 0
        known = list(outputs or [])
        for index, batch in enumerate(self.batches):  # float32 references, at most REFERENCE_BYTES of them
            leaves = known[index] if index < len(known) else self._run(root, batch)
            leaves = [t.float() for t in leaves]
            if self.reference and kept + sum(t.numel() * 4 for t in leaves) > REFERENCE_BYTES:
                break
            self.reference.append(leaves)
            kept += sum(t.numel() * 4 for t in leaves)
        self.batches = self.batches[:len(self.reference)]
        self.samples = int(sum(len(b[0]) for b in self.batches))
        with torch.no_grad():
            self.names = output_names(root(*(t[:1] for t in self.batches[0])))
        if len(self.names) != len(self.reference[0]):
            self.names = [str(i) for i in range(len(self.reference[0]))]
        try:
            self.layouts = plan_layouts(self.names, [t.double().numpy() for t in self.reference[0]], self.spec)
        except ValueError as bad:
            raise PolicyError(f"policy: {bad}") from None
        self.seconds += time.perf_counter() - started

    def reference_for(self, batches: Sequence[tuple[torch.Tensor, ...]]) -> list[list[torch.Tensor]] | None:
        """The original's outputs on ``batches`` when they are a prefix of the checker's (a last batch cut
        short included, for outputs with a batch axis); else None."""
        if len(batches) > len(self.reference):
            return None
        out = []
        for batch, mine, reference in zip(batches, self.batches, self.reference):
            size, full = len(batch[0]), len(mine[0])
            if size == full and all(torch.equal(a, b) for a, b in zip(batch, mine)):
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
        return [t.to(torch.float64) for t in output_leaves(module(*batch))]

    def layout(self) -> list[dict[str, Any]]:
        """The outputs as measured: names, kinds, axes and slices (for the report)."""
        return [layout.to_dict() for layout in self.layouts]

    def measure(self, module: nn.Module, bound: Fidelity | None = None, *, final: bool = False) -> dict[str, Any]:
        """{rel_error, worst, worst_rel_error, pooled_rel_error, agreement, outputs, samples, data, stopped_early,
        and metric values where measured}.

        With ``bound``, measuring stops once a quarter of the samples have run and the running error is
        beyond 1.5x the bound (the answer is clear); ``samples`` then counts those measured. The task
        metric is evaluated when ``bound`` needs it (within ``metric_limit``) or when ``final``.
        """
        started = time.perf_counter()
        self.calls += 1
        reduce = self.spec.reduce
        acc = ErrorAccumulator(self.layouts)
        seen, stopped = 0, False
        loose = bound.loosened(EARLY_FACTOR) if bound is not None else None
        for batch, reference in zip(self.batches, self.reference):
            acc.add(reference, self._run(module, batch))
            seen += len(batch[0])
            if loose is not None and seen * 4 >= self.samples and seen < self.samples:
                partial = acc.result(reduce)
                if failures(partial, loose):
                    stopped = True
                    break
        out = acc.result(reduce)
        out.update(samples=seen, data=self.data, stopped_early=stopped)
        self.seconds += time.perf_counter() - started
        wanted = final or (bound is not None and bound.needs_metric and not stopped)
        if self.metric is not None and wanted and (final or self.metric_left):
            out.update(self.evaluate_metric(module, count=not final))
        elif self.metric is not None and wanted:
            out["metric_skipped"] = f"the metric's {self.metric_limit} search evaluations are spent"
        return out

    @property
    def metric_left(self) -> bool:
        """Whether a search measurement may still evaluate the metric (within ``metric_limit``)."""
        return self.metric is not None and self.metric_calls < self.metric_limit

    def evaluate_metric(self, module: nn.Module, count: bool = True) -> dict[str, Any]:
        """The task metric of ``module`` and of the original (evaluated once), and the drop between them."""
        assert self.metric is not None and self.metric_original is not None
        if count:
            self.metric_calls += 1
        value = self.metric(module)
        return {"metric": value, "metric_original": self.metric_original, "metric_name": self.metric.name,
                "metric_higher_is_better": self.metric.higher_is_better,
                "metric_drop": self.metric.drop(self.metric_original, value)}
