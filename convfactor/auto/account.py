"""What a resolution reports (``report.extra['auto']``): one record the phases fill, laid out as JSON once.

The phases of ``resolve_policy`` each add their part (notes and warnings as they go, the allocation's
account, the search, the speed check, ...); ``to_json`` is the only place that decides the report's keys
and their order, so the schema can be read here rather than collected from every phase.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ResolutionAccount"]

# Optional parts, in the order the report lists them; each appears only when a phase produced it.
_OPTIONAL_BEFORE_LAYERS = ("statistics", "target", "search", "speed_check", "regularization", "verification", "latency")
_OPTIONAL_AFTER_LAYERS = ("fidelity_bound", "time_budget")


@dataclass
class ResolutionAccount:
    """The JSON-able account of one resolution.

    Attributes:
        selection: how candidates were scored (weight-based, or data-aware on so many samples).
        data_split: which samples fit, select and check (``DataSplit.describe``).
        notes: facts the user may want (cut phases, ignored ranks, flushed denormals, ...).
        warnings: accuracy warnings, published as ``FidelityWarning``.
        speed_warnings: speed and cost warnings, published as ``SpeedWarning``.
        statistics: reduced covariance forms and how candidates were scored, where not exact.
        target: the allocation's account (``Allocator.choose``), with a target or a fidelity bound.
        search: the measured search's probes (``measured_allocation``), when it measured.
        speed_check: faster forms swapped in under a MACs/params target and the whole-model timing.
        regularization: the data-aware fit's damping chosen by held-out error, when it ran.
        verification: the latency check's rounds of dropped layers.
        latency: the latency model's runtime, device, threads, cache and variants measured.
        layers: per layer: shape, rule, chosen option, alternatives, and why.
        predicted_loss: the allocation objective of the chosen options.
        fidelity_bound: the policy's bound, as written.
        time_budget: ``AutoOptions.time_budget``, the time used and the phases it cut.
    """

    selection: str
    data_split: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    speed_warnings: list[str] = field(default_factory=list)
    statistics: dict[str, Any] | None = None
    target: dict[str, Any] | None = None
    search: dict[str, Any] | None = None
    speed_check: dict[str, Any] | None = None
    regularization: dict[str, Any] | None = None
    verification: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    layers: dict[str, Any] = field(default_factory=dict)
    predicted_loss: float | None = None
    fidelity_bound: dict[str, Any] | None = None
    time_budget: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The report's ``extra['auto']``: fixed keys first, then each optional part that was produced."""
        out: dict[str, Any] = {"selection": self.selection, "notes": self.notes, "warnings": self.warnings,
                               "speed_warnings": self.speed_warnings, "data_split": self.data_split}
        out.update({key: getattr(self, key) for key in _OPTIONAL_BEFORE_LAYERS if getattr(self, key) is not None})
        out["layers"] = self.layers
        out["predicted_loss"] = self.predicted_loss
        out.update({key: getattr(self, key) for key in _OPTIONAL_AFTER_LAYERS if getattr(self, key) is not None})
        return out
