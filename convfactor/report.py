"""The factorize report: every decision per layer, with its cost and error, and why the rest was not rewritten.

``FactorizeReport.plan()`` is the part needed to rebuild the factorized model from the original
architecture (``convfactor.load``): whether BatchNorm was folded and the method and rank per layer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .ranks import rank_text
from .tables import format_grid

__all__ = ["LayerDecision", "FactorizeReport", "format_table", "fidelity_lines", "warning_line", "human_count"]

REPLACED, SKIPPED, UNMATCHED = "replaced", "skipped", "unmatched"


def _macs_ratio(before: int | None, after: int | None) -> float | None:
    """MACs after / before, or None when either is unknown (no example inputs) or before is 0."""
    return after / before if before and after is not None else None


@dataclass
class LayerDecision:
    """What happened to one Conv/Linear layer."""

    name: str
    layer_type: str
    shape: str  # e.g. "64->128 3x3 /2"
    status: str  # replaced | skipped | unmatched
    method: str | None = None
    rank: Any = None  # int or list of ints, as resolved
    rule: int | None = None  # 1-based index of the policy rule that decided
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    weight_error: float | None = None  # ||W - W_hat|| / ||W||
    reason: str | None = None  # why a layer was not rewritten

    @property
    def macs_ratio(self) -> float | None:
        return _macs_ratio(self.macs_before, self.macs_after)

    @property
    def params_ratio(self) -> float | None:
        return self.params_after / self.params_before if self.params_before else None


@dataclass
class FactorizeReport:
    """Per-layer decisions and model totals of one ``factorize`` call."""

    layers: list[LayerDecision] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    zeros_before: int = 0  # parameter entries exactly zero (p_u's numerator), the caller's model
    zeros_after: int = 0  # the same on the factorized model
    macs_before: int | None = None  # whole model, per sample (Conv + Linear)
    macs_after: int | None = None
    input_shapes: list[list[int]] | None = None
    capture: str = "fx"  # "fx" (graph rewrite) or "modules" (module-level replacement, no trace)
    fold_batchnorm: bool = True
    folded: list[list[str]] = field(default_factory=list)  # [conv, batchnorm] pairs
    policy: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # later stages (ONNX, fidelity, latency) add here
    warnings: list[str] = field(default_factory=list)  # the result may not be what was asked (fidelity, target)

    # -- derived ------------------------------------------------------------------------------
    @property
    def replaced(self) -> list[LayerDecision]:
        return [d for d in self.layers if d.status == REPLACED]

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def macs_ratio(self) -> float | None:
        return _macs_ratio(self.macs_before, self.macs_after)

    @property
    def zero_fraction_before(self) -> float:
        """Exact zeros / parameters of the original (unstructured pruning it already had)."""
        return self.zeros_before / self.params_before if self.params_before else 0.0

    @property
    def zero_fraction_after(self) -> float:
        """Exact zeros / parameters of the factorized model: the p_u the challenge score can count."""
        return self.zeros_after / self.params_after if self.params_after else 0.0

    @property
    def costlier(self) -> list[dict[str, Any]]:
        """Replacements that save no MACs (parameters when MACs are unknown): each costs as much as the
        layer it replaces or more, while adding error. ``only_if_cheaper: true`` on a rule skips them. A pruning
        form (sal) is not one: it keeps the layer's cost and saves zeros, counted in ``zeros_after``."""
        from .methods import available_methods, get_method  # late: the methods do not need the report

        out = []
        for d in self.replaced:
            if d.method in available_methods() and get_method(d.method).pruning:
                continue
            ratio, what = (d.macs_ratio, "MACs") if d.macs_ratio is not None else (d.params_ratio, "parameters")
            if ratio is not None and ratio >= 1:
                out.append({"layer": d.name, "method": d.method, "rule": d.rule, "macs_ratio": d.macs_ratio,
                            "params_ratio": d.params_ratio, "message": f"{d.name} ({d.method}) costs x{ratio:.3f} "
                            f"the {what} of the layer it replaces; only_if_cheaper: true on its rule skips it"})
        return out

    def all_warnings(self) -> list[str]:
        """Every warning as one line: the result's own (fidelity, missed target) and costlier replacements."""
        return list(self.warnings) + [c["message"] for c in self.costlier]

    def plan(self) -> dict[str, Any]:
        """What ``convfactor.load`` needs to rebuild the factorized structure (JSON-able)."""
        return {
            "format": "convfactor-plan/1",
            "capture": self.capture,
            "fold_batchnorm": self.fold_batchnorm,
            "layers": {d.name: {"method": d.method, "rank": d.rank} for d in self.replaced},
        }

    # -- output -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["totals"] = {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_ratio": self.params_ratio,
            "zeros_before": self.zeros_before,
            "zeros_after": self.zeros_after,
            "zero_fraction_before": self.zero_fraction_before,
            "zero_fraction_after": self.zero_fraction_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "macs_ratio": self.macs_ratio,
            "layers_replaced": len(self.replaced),
            "layers_total": len(self.layers),
        }
        out["plan"] = self.plan()
        out["costlier"] = self.costlier
        return out

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def format_table(self) -> str:
        return format_table(self)

    def __str__(self) -> str:
        return self.format_table()


def human_count(n: int | float | None) -> str:
    """12345678 -> '12.3M'; None -> 'n/a'."""
    if n is None:
        return "n/a"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def _ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.3f}"


def format_table(report: FactorizeReport) -> str:
    """A fixed-width per-layer table followed by the totals block.

    When the report carries a per-layer onnxruntime profile (``extra["layer_times"]``: {name:
    {"original_ms", "factorized_ms"}}), a "time ratio" column (factorized / original, measured) sits
    beside the MACs ratio, and replacements that run slower than the layer they replaced say so.
    """
    times = report.extra.get("layer_times") or {}
    headers = ["layer", "type", "shape", "method", "rank", "params", "MACs", "MACs ratio"]
    headers += ["time ratio"] if times else []
    headers += ["W err", "note"]
    rows = []
    for d in report.layers:
        time_cells, note = [], d.reason or ""
        if times:
            t = times.get(d.name)
            ratio = (t["factorized_ms"] / t["original_ms"]) if t and t.get("original_ms") else None
            time_cells = [_ratio(ratio) if d.status == REPLACED else ""]
            if d.status == REPLACED and ratio is not None and round(ratio, 3) > 1:
                note = "SLOWER than the original layer"
        params = human_count(d.params_before)
        macs = human_count(d.macs_before)
        if d.status == REPLACED:
            params += f"->{human_count(d.params_after)}"
            macs += f"->{human_count(d.macs_after)}"
        rows.append([
            d.name,
            d.layer_type,
            d.shape,
            d.method if d.status == REPLACED else f"({d.status})",
            rank_text(d.rank),
            params,
            macs,
            _ratio(d.macs_ratio) if d.status == REPLACED else "",
            *time_cells,
            f"{d.weight_error:.2e}" if d.weight_error is not None else "",
            note,
        ])
    lines = format_grid(headers, rows, free_last=True)  # the note column is free text: not padded
    lines.append("")
    n_rep = len(report.replaced)
    lines.append(f"layers replaced: {n_rep}/{len(report.layers)}"
                 + (f"; BatchNorm folded into {len(report.folded)} layer(s)" if report.folded else ""))
    lines.append(f"params: {human_count(report.params_before)} -> {human_count(report.params_after)} "
                 f"(x{report.params_ratio:.3f})")
    lines.append(f"zeros (p_u): {report.zero_fraction_before:.3f} -> {report.zero_fraction_after:.3f} of the params "
                 f"({human_count(report.zeros_before)} -> {human_count(report.zeros_after)} exact zeros)")
    if report.macs_before is not None:
        lines.append(f"MACs/sample: {human_count(report.macs_before)} -> {human_count(report.macs_after)} "
                     f"(x{_ratio(report.macs_ratio)})")
    else:
        lines.append("MACs: n/a (give example inputs to count them: example_inputs=..., CLI: --input-shape)")
    check = report.extra.get("fidelity_check")
    if check:
        lines.extend(fidelity_lines(check))
    selection = (report.extra.get("auto") or {}).get("selection")
    if selection:
        lines.append(f"selection: {selection}")
    for note in report.notes:
        lines.append(f"note: {note}")
    for warning in report.all_warnings():
        lines.append(warning_line(warning))
    return "\n".join(lines)


def warning_line(message: str) -> str:
    """'warning (accuracy): ...' for a warning whose message starts with its subject, else 'warning: ...'."""
    subject, sep, text = message.partition(": ")
    if sep and subject in ("accuracy", "speed"):
        return f"warning ({subject}): {text}"
    return f"warning: {message}"


def fidelity_lines(check: dict[str, Any]) -> list[str]:
    """The result's fidelity in words: held-out verdict, in-sample beside it, the metric, one row per output."""
    verdict = "within" if check["passed"] else "OUTSIDE"
    where = f" ({check['worst']})" if check.get("worst") else ""
    agreement = "" if check.get("agreement") is None else f", top-1 agreement {check['agreement']:.3f}"
    bound = check.get("bound_text") or ", ".join(f"{k} {v}" for k, v in check["bound"].items())
    kept = "accuracy kept" if check["passed"] else "accuracy NOT kept"
    lines = [f"output vs original: {kept}: worst-slice relative error {_number(check['rel_error'])}{where}{agreement} "
             f"on {check['samples']} {check['data']} ({verdict} {check['bound_source']}: {bound})"]
    inside = check.get("in_sample")
    if inside:
        overfit = f"; held-out {check['overfit']:.1f}x in-sample: the fit overfits" if check.get("overfit") else ""
        lines.append(f"  in-sample (fit samples, {inside['samples']}): worst-slice relative error "
                     f"{_number(inside['rel_error'])}{overfit}")
    if "metric" in check:
        lines.append(f"  {check.get('metric_name', 'metric')}: {_number(check['metric_original'])} (original) -> "
                     f"{_number(check['metric'])} (result), drop {_number(check['metric_drop'])}")
    rows = check.get("outputs") or []
    if len(rows) > 1 or any(r.get("slices", 1) > 1 for r in rows):
        for row in rows:
            extra = f", agreement {row['agreement']:.3f}" if "agreement" in row else ""
            lines.append(f"  output {row['name']} ({row['kind']}): error {_number(row['rel_error'])}, worst of "
                         f"{row['slices']} slice(s) [{row['worst_slice']}] {_number(row['worst_slice_error'])}{extra}")
    return lines


def _number(value: Any) -> str:
    if isinstance(value, (int, float)):
        return f"{value:.4g}"
    return str(value)
