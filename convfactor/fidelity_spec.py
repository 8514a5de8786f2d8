"""What a factorized model must keep: the policy's ``fidelity:`` bound and how each output is measured.

Plain data, like the rest of the policy::

    fidelity:
      max_rel_error: 0.05        # the worst output slice's ||a - b|| / ||a|| (reduce: worst), or pooled
      min_agreement: 0.99        # top-1 agreement, on the outputs declared as class scores only
      max_metric_drop: 0.01      # the user's task metric: at most this much worse than the original's
      min_metric: 0.9            #   ... or at least this value (either or both)
      reduce: worst              # worst (default): every output slice on its own scale; pooled: one number
      outputs:                   # by index (0, 1, ...) or name (dict keys; ONNX output names)
        0: {kind: scores}        # scores | probabilities | regression | state | ignore
        1: {slices: {boxes: [0, 4], classes: [4, 84]}, axis: 1}

Each output is split along its feature axis (``axis``; by default its channel-like axis, see
``convfactor.output_error.feature_axis``; axis 0 is the samples) into slices, each measured relative to its
own norm, so a small-norm head cannot hide under a large one. Without declared ``slices`` the split follows
the data: adjacent channels whose scale stays within ``SCALE_SPREAD`` of each other form one slice
(``convfactor.output_error``). Top-1 agreement is computed only where an output is
declared a class kind (``CLASS_KINDS``): ``kind: scores`` (logits) or ``kind: probabilities`` (an output that
already is a distribution along its axis, e.g. after a final softmax; distilled with KL on the log of the
given probabilities, where ``scores`` would apply a second softmax). A box or landmark regression head or a
recurrent state has no "class" to agree on. ``kind: ignore`` leaves an output out (a debug tensor, a constant).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import PolicyError

__all__ = ["Fidelity", "OutputSpec", "OUTPUT_KINDS", "CLASS_KINDS", "REDUCTIONS", "parse_fidelity", "is_number"]

OUTPUT_KINDS = ("auto", "scores", "probabilities", "regression", "state", "ignore")
CLASS_KINDS = ("scores", "probabilities")  # outputs with a class axis: top-1 agreement measured, KL distilled
REDUCTIONS = ("worst", "pooled")
_FRACTION_KEYS = ("max_rel_error", "min_agreement")
_FIDELITY_KEYS = (*_FRACTION_KEYS, "max_metric_drop", "min_metric", "reduce", "outputs")
_OUTPUT_KEYS = ("kind", "axis", "slices")


@dataclass(frozen=True)
class OutputSpec:
    """How one output is measured: its kind, its feature axis and, optionally, named slices along it."""

    kind: str = "auto"  # auto: measured by slices, no agreement; scores / probabilities: also top-1 agreement
    axis: int | None = None  # None: the output's channel-like axis (``convfactor.output_error.feature_axis``)
    slices: tuple[tuple[str, int, int], ...] = ()  # (name, start, stop) along ``axis``

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.kind != "auto":
            out["kind"] = self.kind
        if self.axis is not None:
            out["axis"] = self.axis
        if self.slices:
            out["slices"] = {name: [start, stop] for name, start, stop in self.slices}
        return out


@dataclass(frozen=True)
class Fidelity:
    """The bound a result must measure within, against the original, on held-out inputs.

    ``max_rel_error``: the largest relative L2 error allowed, of the worst output slice (``reduce:
    worst``) or of all outputs pooled (``reduce: pooled``); ``min_agreement``: the smallest top-1
    agreement of each output declared as class scores; ``max_metric_drop`` / ``min_metric``: the user's
    task metric (``factorize(metric=...)``) against the original's / an absolute floor. None: not checked.
    """

    max_rel_error: float | None = None
    min_agreement: float | None = None
    max_metric_drop: float | None = None
    min_metric: float | None = None
    reduce: str = "worst"
    outputs: tuple[tuple[str, OutputSpec], ...] = field(default_factory=tuple)

    @property
    def has_criterion(self) -> bool:
        """True when something is bounded (a fidelity of output declarations alone bounds nothing)."""
        return any(getattr(self, k) is not None for k in ("max_rel_error", "min_agreement", "max_metric_drop",
                                                          "min_metric"))

    @property
    def needs_metric(self) -> bool:
        return self.max_metric_drop is not None or self.min_metric is not None

    def output_spec(self, index: int, name: str | None = None) -> OutputSpec:
        """The declared spec of output ``index`` (or ``name``), else the default."""
        for key, spec in self.outputs:
            if key == str(index) or (name is not None and key == name):
                return spec
        return OutputSpec()

    def loosened(self, factor: float) -> Fidelity:
        """The output criteria ``factor`` times wider, the metric's left out: what an early stop on part of
        the data judges (the metric is not evaluated on a part)."""
        error, agreement = self.max_rel_error, self.min_agreement
        return Fidelity(None if error is None else error * factor,
                        None if agreement is None else 1 - (1 - agreement) * factor, reduce=self.reduce,
                        outputs=self.outputs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in ("max_rel_error", "min_agreement", "max_metric_drop",
                                                             "min_metric") if getattr(self, k) is not None}
        if self.reduce != "worst":
            out["reduce"] = self.reduce
        if self.outputs:
            out["outputs"] = {key: spec.to_dict() for key, spec in self.outputs}
        return out

    def describe(self) -> str:
        """'max_rel_error 0.05 (worst slice), min_agreement 0.99, max_metric_drop 0.01'."""
        parts = []
        if self.max_rel_error is not None:
            how = "worst slice" if self.reduce == "worst" else "pooled"
            parts.append(f"max_rel_error {self.max_rel_error:g} ({how})")
        for key in ("min_agreement", "max_metric_drop", "min_metric"):
            if getattr(self, key) is not None:
                parts.append(f"{key} {getattr(self, key):g}")
        return ", ".join(parts) or "no criterion"


def parse_fidelity(raw: Any) -> Fidelity | None:
    """The policy's ``fidelity:`` mapping as a ``Fidelity`` (None stays None); errors name the key."""
    if raw is None:
        return None
    if isinstance(raw, Fidelity):
        return raw
    example = "{max_rel_error: 0.05, min_agreement: 0.99}"
    if not isinstance(raw, Mapping) or not raw:
        raise PolicyError(f"policy: 'fidelity' must be a mapping like {example}, got {raw!r}")
    unknown = [k for k in raw if k not in _FIDELITY_KEYS]
    if unknown:
        raise PolicyError(f"policy: unknown fidelity key {unknown[0]!r} (allowed: {', '.join(_FIDELITY_KEYS)})")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _FRACTION_KEYS:
            if not is_number(value) or not 0 < value <= 1:
                raise PolicyError(f"policy: fidelity {key} must be a number in (0, 1], got {value!r}")
            values[key] = float(value)
        elif key == "max_metric_drop":
            if not is_number(value) or value < 0:
                raise PolicyError(f"policy: fidelity max_metric_drop must be a number >= 0, got {value!r}")
            values[key] = float(value)
        elif key == "min_metric":
            if not is_number(value):
                raise PolicyError(f"policy: fidelity min_metric must be a finite number, got {value!r}")
            values[key] = float(value)
        elif key == "reduce":
            if value not in REDUCTIONS:
                raise PolicyError(f"policy: fidelity reduce must be one of {', '.join(REDUCTIONS)}, got {value!r}")
            values[key] = value
        else:
            values[key] = _parse_outputs(value)
    if not any(k in values for k in (*_FRACTION_KEYS, "max_metric_drop", "min_metric")) and "outputs" not in values:
        raise PolicyError(f"policy: 'fidelity' names no criterion; give one of max_rel_error, min_agreement, "
                          f"max_metric_drop, min_metric (e.g. {example})")
    return Fidelity(**values)


def _parse_outputs(raw: Any) -> tuple[tuple[str, OutputSpec], ...]:
    example = "{0: {kind: scores}, boxes: {slices: {xy: [0, 2], wh: [2, 4]}}}"
    if not isinstance(raw, Mapping) or not raw:
        raise PolicyError(f"policy: fidelity outputs must be a mapping like {example}, got {raw!r}")
    out = []
    for key, spec in raw.items():
        if isinstance(key, bool) or not isinstance(key, (int, str)) or (isinstance(key, int) and key < 0):
            raise PolicyError(f"policy: fidelity outputs: key {key!r} must be an output index (0, 1, ...) or name")
        where = f"policy: fidelity outputs {key!r}"
        if not isinstance(spec, Mapping):
            raise PolicyError(f"{where} must be a mapping like {{kind: scores}}, got {spec!r}")
        unknown = [k for k in spec if k not in _OUTPUT_KEYS]
        if unknown:
            raise PolicyError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(_OUTPUT_KEYS)})")
        kind = spec.get("kind", "auto")
        if kind not in OUTPUT_KINDS:
            raise PolicyError(f"{where}: kind must be one of {', '.join(OUTPUT_KINDS)}, got {kind!r}")
        axis = spec.get("axis")
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int) or axis < 1):
            raise PolicyError(f"{where}: axis must be an int >= 1 (axis 0 is the samples), got {axis!r}")
        slices = spec.get("slices", {})
        if not isinstance(slices, Mapping):
            raise PolicyError(f"{where}: slices must map names to [start, stop], got {slices!r}")
        parsed = []
        for name, bounds in slices.items():
            ok = (isinstance(bounds, (list, tuple)) and len(bounds) == 2
                  and all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
                  and 0 <= bounds[0] < bounds[1])
            if not ok:
                raise PolicyError(f"{where}: slice {name!r} must be [start, stop] with 0 <= start < stop, "
                                  f"got {bounds!r}")
            parsed.append((str(name), int(bounds[0]), int(bounds[1])))
        out.append((str(key), OutputSpec(kind, axis, tuple(parsed))))
    return tuple(out)


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): what a bound, a budget or a ridge may be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
