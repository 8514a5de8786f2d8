"""Per-output, per-slice error of a model's outputs against the original's: one number cannot hide a head.

For every output tensor ``a`` (original) and ``b`` (candidate), axis 0 the samples, the feature axis
(declared, or the channel-like axis ``feature_axis`` finds) is cut into slices; each slice's relative
error is ``||a_s - b_s|| / ||a_s||`` over all samples, so a 2-channel score head next to a 4-channel box
head of 1000x its norm is measured on its own scale.
Slices are declared in the policy (``fidelity: outputs:``) or found from the original's outputs: a slice
ends where the RMS of adjacent channels jumps by more than ``SCALE_SPREAD``, the same way in (nearly) every
sample (``scale_slices``; a YOLO-style
``[N, 4 + C, A]`` tensor splits into its box rows and its class rows); more than ``MAX_AUTO_SLICES`` runs is
no head structure, and the axis stays one slice. Then::

    worst_rel_error  = max over outputs and slices of the slice's relative error   (reduce: worst)
    pooled_rel_error = sqrt(sum ||a - b||^2 / sum ||a||^2) over every output       (reduce: pooled)
    agreement        = min over outputs declared a class kind (``scores``, ``probabilities``) of the top-1
                       agreement along the axis

An output declared ``probabilities`` must be one along its axis: the original's values in [0, 1], summing to
1 within ``PROBABILITY_TOLERANCE`` (``plan_layouts`` says so in one line, naming the output; logits are
``scores``).

The sums are accumulated batch by batch (``ErrorAccumulator``): memory is one vector of per-channel sums
per output, not the outputs. Both the automatic policy's checks (torch) and ``check_fidelity``
(onnxruntime) measure through this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .fidelity_spec import CLASS_KINDS, Fidelity

__all__ = ["SCALE_SPREAD", "MAX_AUTO_SLICES", "PROBABILITY_TOLERANCE", "OutputLayout", "plan_layouts",
           "feature_axis", "scale_slices", "ErrorAccumulator", "output_names"]

SCALE_SPREAD = 100.0  # a new slice starts where a channel's RMS leaves [max / 100, min * 100] of the current one
CONSISTENT = 0.9  # the share of samples a head boundary's jump must show, the same way
MAX_AUTO_SLICES = 16  # more runs than this is no head structure (a spatial or time axis): one slice instead
PROBABILITY_TOLERANCE = 1e-3  # |sum - 1| along the axis of an output declared ``probabilities`` (float32 softmax)
_NEGLIGIBLE = 1e-12  # a slice whose squared norm is below this share of its output's is measured against the output


@dataclass(frozen=True)
class OutputLayout:
    """How one output is measured: its name, kind, feature axis and slices ``(name, start, stop)``."""

    index: int
    name: str
    kind: str  # auto | scores | probabilities | regression | state | ignore
    axis: int | None  # None: the output has no feature axis (one slice, the whole output)
    slices: tuple[tuple[str, int, int], ...]
    declared: bool  # slices from the policy (else found from the data)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "kind": self.kind, "axis": self.axis,
                "slices": [[n, a, b] for n, a, b in self.slices], "declared": self.declared}


def output_names(output: Any) -> list[str]:
    """Names of a torch model output's floating-point tensors in pytree order: dict keys and tuple
    positions joined by dots (``"boxes"``, ``"1.0"``); a plain tensor is ``"0"``."""
    import torch

    flat, _ = torch.utils._pytree.tree_flatten_with_path(output)
    names = []
    for path, leaf in flat:
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
            names.append(".".join(parts) if parts else "0")
    return names


def feature_axis(shape: Sequence[int]) -> int | None:
    """The channel-like axis of an output of ``shape`` (axis 0 the samples), where heads sit side by side.

    ``[N, C]``: 1. ``[N, A, B]``: the shorter of 1 and 2 (``[N, 4 + C, anchors]`` YOLO-style, ``[N, anchors,
    4 + C]`` SSD-style). ``[N, C, H, W]``: 1, unless the last axis is at most 4 and axis 1 longer (a
    channels-last map such as ``[N, H, W, 2]``). 5-D and more: 1. ``[N]`` and scalars: None (one slice).
    A spatial or time axis is never chosen on purpose: its entries differ in scale by content, not by head.
    """
    ndim = len(shape)
    if ndim <= 1:
        return None
    if ndim == 3:
        return 1 if shape[1] <= shape[2] else 2
    if ndim == 4 and shape[3] <= 4 < shape[1]:
        return 3
    return 1


def scale_slices(rms: np.ndarray, spread: float = SCALE_SPREAD) -> tuple[tuple[str, int, int], ...]:
    """Slices between adjacent channels whose scales jump by more than ``spread``, in (nearly) every sample.

    ``rms``: per-sample RMS of each channel, ``[N, C]`` (a 1-D ``[C]`` is one sample). A head boundary is an
    abrupt, consistent jump: the channels' RMS over all samples differ by more than ``spread`` and at least
    ``CONSISTENT`` of the samples jump the same way by more than ``sqrt(spread)``. A smooth decay (the tails
    of a posterior over pitch bins) or a content-dependent pattern (which class, which pitch is active
    varies by sample) is no head boundary. Silent channels (RMS 0) never start a slice.
    """
    rms = np.atleast_2d(np.asarray(rms, dtype=np.float64))
    overall = np.sqrt((rms ** 2).mean(axis=0))
    bounds, previous = [0], None
    for c, value in enumerate(overall):
        if value <= 0:
            continue
        if previous is not None and max(value, overall[previous]) > spread * min(value, overall[previous]):
            up = value > overall[previous]
            a, b = rms[:, previous], rms[:, c]
            with np.errstate(divide="ignore", invalid="ignore"):
                step = math.sqrt(spread)
                same_way = (b > step * a) if up else (a > step * b)
            if same_way.mean() >= CONSISTENT:
                bounds.append(c)
        previous = c
    bounds.append(len(overall))
    return tuple((f"{a}:{b}", a, b) for a, b in zip(bounds[:-1], bounds[1:]))


def _per_sample_rms(array: np.ndarray, axis: int) -> np.ndarray:
    """``[N, C]``: each sample's RMS of each entry along ``axis``."""
    values = np.moveaxis(np.asarray(array, dtype=np.float64), axis, 1)
    values = values.reshape(values.shape[0], values.shape[1], -1)
    return np.sqrt((values ** 2).mean(axis=2))


def plan_layouts(names: Sequence[str], reference: Sequence[np.ndarray], spec: Fidelity | None) -> list[OutputLayout]:
    """Each output's layout from the policy's declarations and the original's outputs (one batch or more).

    Raises:
        ValueError: a declared slice or axis does not fit the output (the message names both).
    """
    spec = spec or Fidelity()
    known = {str(i) for i in range(len(names))} | set(names)
    for key, _ in spec.outputs:
        if key not in known:
            raise ValueError(f"fidelity outputs {key!r} names no output of the model (its outputs: "
                             f"{', '.join(repr(n) for n in names)}, or their indices 0-{len(names) - 1})")
    layouts = []
    for index, (name, array) in enumerate(zip(names, reference)):
        declared = spec.output_spec(index, name)
        axis = declared.axis if declared.axis is not None else feature_axis(np.shape(array))
        if axis is not None and np.ndim(array) <= axis:
            raise ValueError(f"fidelity outputs {name!r}: axis {axis} does not exist in an output of "
                             f"shape {list(np.shape(array))}")
        if axis is None and declared.slices:
            raise ValueError(f"fidelity outputs {name!r}: an output of shape {list(np.shape(array))} has no "
                             f"feature axis to slice")
        if declared.kind == "probabilities":
            _check_probabilities(name, np.asarray(array), axis)
        if axis is None:
            slices: tuple = (("all", 0, 1),)
        elif declared.slices:
            size = array.shape[axis]
            for slice_name, start, stop in declared.slices:
                if stop > size:
                    raise ValueError(f"fidelity outputs {name!r}: slice {slice_name!r} [{start}, {stop}] exceeds the "
                                     f"{size} entries of axis {axis} (shape {list(array.shape)})")
            slices = declared.slices
        else:
            slices = scale_slices(_per_sample_rms(array, axis))
            if len(slices) > MAX_AUTO_SLICES:
                slices = ((f"0:{array.shape[axis]}", 0, array.shape[axis]),)
        layouts.append(OutputLayout(index, name, declared.kind, axis, tuple(slices), bool(declared.slices)))
    return layouts


def _check_probabilities(name: str, array: np.ndarray, axis: int | None) -> None:
    """A ``probabilities`` output must be a distribution along ``axis`` in the original's outputs."""
    where = f"fidelity outputs {name!r}: kind probabilities"
    if axis is None or array.shape[axis] < 2:
        raise ValueError(f"{where} needs a class axis of 2 or more entries; the output has shape "
                         f"{list(array.shape)} (declare axis:)")
    low, high = float(array.min()), float(array.max())
    total = array.sum(axis=axis)
    off = float(np.abs(total - 1).max())
    if low < 0 or high > 1 or not off <= PROBABILITY_TOLERANCE:
        raise ValueError(f"{where} needs values in [0, 1] summing to 1 along axis {axis}; the original's are in "
                         f"[{low:.4g}, {high:.4g}] and sum to {float(total.min()):.4g}..{float(total.max()):.4g} "
                         f"(logits are kind scores; or declare the class axis with axis:)")


def _channel_sums(values: np.ndarray, axis: int) -> np.ndarray:
    return values.sum(axis=tuple(i for i in range(values.ndim) if i != axis))


class ErrorAccumulator:
    """Squared errors and norms per output channel, added batch by batch; ``result`` reduces them."""

    def __init__(self, layouts: Sequence[OutputLayout]):
        self.layouts = list(layouts)
        self.err2 = [None] * len(self.layouts)
        self.ref2 = [None] * len(self.layouts)
        self.agree = [0] * len(self.layouts)
        self.count = [0] * len(self.layouts)
        self.finite = True

    def add(self, reference: Sequence[Any], candidate: Sequence[Any]) -> None:
        """One batch: the original's and the candidate's outputs (tensors or arrays), in the same order."""
        if len(reference) != len(candidate):
            raise ValueError(f"the candidate returns {len(candidate)} output(s), the original {len(reference)}")
        for i, (layout, a, b) in enumerate(zip(self.layouts, reference, candidate)):
            if layout.kind == "ignore":
                continue
            a, b = _float64(a), _float64(b)
            if a.shape != b.shape:
                raise ValueError(f"output {layout.name!r} has shape {list(b.shape)} in the candidate, "
                                 f"{list(a.shape)} in the original")
            if not np.isfinite(b).all():
                self.finite = False
                continue
            if layout.axis is None:
                e2, r2 = np.array([((a - b) ** 2).sum()]), np.array([(a ** 2).sum()])
            else:
                e2, r2 = _channel_sums((a - b) ** 2, layout.axis), _channel_sums(a ** 2, layout.axis)
            self.err2[i] = e2 if self.err2[i] is None else self.err2[i] + e2
            self.ref2[i] = r2 if self.ref2[i] is None else self.ref2[i] + r2
            if layout.kind in CLASS_KINDS and layout.axis is not None and a.shape[layout.axis] >= 2:
                same = a.argmax(axis=layout.axis) == b.argmax(axis=layout.axis)
                self.agree[i] += int(same.sum())
                self.count[i] += int(same.size)

    def result(self, reduce: str = "worst") -> dict[str, Any]:
        """{rel_error (by ``reduce``), worst_rel_error, pooled_rel_error, worst, agreement, outputs: [...]}."""
        outputs, worst, worst_name = [], 0.0, None
        total_err2 = total_ref2 = 0.0
        agreements = []
        for i, layout in enumerate(self.layouts):
            if layout.kind == "ignore" or self.err2[i] is None:
                continue
            e2, r2 = self.err2[i], self.ref2[i]
            out_err2, out_ref2 = float(e2.sum()), float(r2.sum())
            total_err2 += out_err2
            total_ref2 += out_ref2
            rows = []
            for slice_name, start, stop in layout.slices:
                se2, sr2 = float(e2[start:stop].sum()), float(r2[start:stop].sum())
                if sr2 <= _NEGLIGIBLE * out_ref2:  # an (almost) silent slice: its error against the output's norm
                    rel, relative_to = _ratio(se2, out_ref2), "output"
                else:
                    rel, relative_to = _ratio(se2, sr2), "slice"
                rows.append({"slice": slice_name, "rel_error": rel, "relative_to": relative_to})
                if worst_name is None or rel > worst:
                    worst = rel
                    worst_name = f"{layout.name}[{slice_name}]" if len(layout.slices) > 1 else layout.name
            entry = {"name": layout.name, "kind": layout.kind, "rel_error": _ratio(out_err2, out_ref2),
                     "slices": rows}
            if self.count[i]:
                entry["agreement"] = self.agree[i] / self.count[i]
                agreements.append(entry["agreement"])
            outputs.append(entry)
        if not self.finite:
            worst, worst_name, total_err2 = math.inf, "non-finite output", math.inf
        pooled = _ratio(total_err2, total_ref2) if total_err2 != math.inf else math.inf
        return {"rel_error": worst if reduce == "worst" else pooled, "reduce": reduce, "worst_rel_error": worst,
                "pooled_rel_error": pooled, "worst": worst_name,
                "agreement": min(agreements) if agreements else None, "outputs": outputs}


def _float64(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def _ratio(err2: float, ref2: float) -> float:
    if ref2 <= 0:
        return 0.0 if err2 <= 0 else math.inf
    return math.sqrt(err2 / ref2)
