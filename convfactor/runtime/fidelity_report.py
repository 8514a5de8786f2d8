"""The fidelity report: each output's error measures against its tolerances, and each export's self-check.

A ``Criterion`` is one measure with its tolerance (``at_most`` for errors, ``at_least`` for agreement);
``FidelityReport.passed`` is true when every criterion of every output and every export check passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Criterion", "OutputFidelity", "ExportCheck", "FidelityReport", "criteria"]


@dataclass(frozen=True)
class Criterion:
    """One tolerance check: ``value <comparison> threshold``, and whether it held."""

    name: str
    value: float
    threshold: float
    comparison: str  # "<=" or ">="
    passed: bool

    @classmethod
    def at_most(cls, name: str, value: float, threshold: float) -> Criterion:
        return cls(name, value, threshold, "<=", bool(value <= threshold))

    @classmethod
    def at_least(cls, name: str, value: float, threshold: float) -> Criterion:
        return cls(name, value, threshold, ">=", bool(value >= threshold))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": _json_float(self.value), "threshold": _json_float(self.threshold),
                "comparison": self.comparison, "passed": self.passed}



@dataclass(frozen=True)
class OutputFidelity:
    """Original vs factorized for one model output."""

    name: str
    shape: tuple[int, ...]  # of all samples together
    metrics: dict[str, float]
    criteria: tuple[Criterion, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.criteria)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape),
                "metrics": {k: _json_float(v) for k, v in self.metrics.items()},
                "criteria": [c.to_dict() for c in self.criteria], "passed": self.passed}



@dataclass(frozen=True)
class ExportCheck:
    """A PyTorch module against its own ONNX export, for one output."""

    model: str  # "original" or "factorized"
    output: str
    rel_l2_error: float
    max_abs_error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(self.rel_l2_error <= self.tolerance)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "output": self.output, "rel_l2_error": _json_float(self.rel_l2_error),
                "max_abs_error": _json_float(self.max_abs_error), "tolerance": self.tolerance,
                "passed": self.passed}



@dataclass(frozen=True)
class FidelityReport:
    """Everything ``check_fidelity`` measured, with a pass/fail per criterion and overall.

    Attributes:
        inputs_generated: True when the inputs were standard-normal noise, not user data.
        input_description: what the inputs were, in words.
        n_samples, n_batches: samples compared and the batches they came in.
        outputs: original vs factorized, per output.
        export_checks: each module vs its ONNX export (empty for models given as ONNX files).
        models: per role ("original", "factorized"): ONNX path and the export details.
    """

    inputs_generated: bool
    input_description: str
    n_samples: int
    n_batches: int
    outputs: tuple[OutputFidelity, ...]
    export_checks: tuple[ExportCheck, ...]
    models: dict[str, dict[str, Any]]

    @property
    def export_passed(self) -> bool:
        """The ONNX exports reproduce their PyTorch modules (True when there was nothing to check)."""
        return all(c.passed for c in self.export_checks)

    @property
    def factorization_passed(self) -> bool:
        """Every criterion holds for every output, original vs factorized."""
        return all(o.passed for o in self.outputs)

    @property
    def passed(self) -> bool:
        return self.export_passed and self.factorization_passed

    @property
    def verdict(self) -> str:
        """``"pass"``, ``"fail: export"`` (results not trustworthy), or ``"fail: factorization"``."""
        if not self.export_passed:
            return "fail: export"
        return "pass" if self.factorization_passed else "fail: factorization"

    def failed_criteria(self) -> list[str]:
        """``"<output>.<criterion>"`` for each criterion that did not hold."""
        return [f"{o.name}.{c.name}" for o in self.outputs for c in o.criteria if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (non-finite numbers become the strings ``"inf"``, ``"-inf"``, ``"nan"``)."""
        return {
            "verdict": self.verdict,
            "passed": self.passed,
            "export_passed": self.export_passed,
            "factorization_passed": self.factorization_passed,
            "inputs_generated": self.inputs_generated,
            "input_description": self.input_description,
            "n_samples": self.n_samples,
            "n_batches": self.n_batches,
            "outputs": [o.to_dict() for o in self.outputs],
            "export_checks": [c.to_dict() for c in self.export_checks],
            "models": self.models,
        }

    def render(self) -> str:
        """A readable multi-line summary."""
        lines = [f"fidelity: {self.verdict.upper()}",
                 f"inputs: {self.input_description}; {self.n_samples} samples in {self.n_batches} batch(es)"]
        if self.inputs_generated:
            lines.append("  (random inputs: a check of the math, not of accuracy on real data)")
        if self.export_checks:
            lines.append("export check, PyTorch vs its ONNX export (relative L2 error):")
            for check in self.export_checks:
                lines.append(f"  {check.model:<10} {check.output:<16} {check.rel_l2_error:.2e} "
                             f"<= {check.tolerance:.0e}  {'ok' if check.passed else 'FAIL'}")
            if not self.export_passed:
                lines.append("  the export does not reproduce the module: the comparison below is not trustworthy")
        lines.append("original vs factorized, both in onnxruntime:")
        for output in self.outputs:
            lines.append(f"  {output.name} {list(output.shape)}")
            for c in output.criteria:
                lines.append(f"    {c.name:<16} {_fmt(c.value):>10} {c.comparison} {_fmt(c.threshold):<10} "
                             f"{'pass' if c.passed else 'FAIL'}")
            unchecked = {k: v for k, v in output.metrics.items() if k not in {c.name for c in output.criteria}}
            if unchecked:
                lines.append("    not checked: " + ", ".join(f"{k} {_fmt(v)}" for k, v in unchecked.items()))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()



def criteria(metrics: dict[str, float], thresholds: dict[str, float | None]) -> tuple[Criterion, ...]:
    upper = ("max_abs_error", "rel_l2_error", "worst_slice_rel_error")  # smaller is better; the rest: larger
    result = []
    for name, threshold in thresholds.items():
        if threshold is None or name not in metrics:
            continue
        check = Criterion.at_most if name in upper else Criterion.at_least
        result.append(check(name, metrics[name], float(threshold)))
    return tuple(result)



def _json_float(value: float) -> float | str:
    if math.isfinite(value):
        return float(value)
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")



def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"
