"""What a sweep measured: one record per point, the Pareto front, the best point within a bound, the table.

A point's quality is its task metric when one was given (in the metric's direction), else its held-out
relative error (lower is better); its speed is the onnxruntime speedup over the original, timed
interleaved with it. The Pareto front is the set of convfactor's points no other of its points beats on
both (``pareto_front``); the uniform baseline's points are measured the same way and shown beside it.
With int8 points (``sweep(quantize="int8")``), each convfactor point's int8 form is one of convfactor's
points too (on the front, and ``best`` when fastest within the bound); ``original int8`` (the original,
only quantized) is shown beside them as a reference, as the baseline is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

__all__ = ["SweepPoint", "SweepResult", "pareto_front", "measured_fields"]


@dataclass
class SweepPoint:
    """One measured model of a sweep.

    Attributes:
        label: ``macs=0.5``, ``macs=0.5 int8`` for its int8 form, ``original int8``, or ``uniform spatial_svd
            r=0.31`` for the baseline.
        kind, fraction: the target asked for (the baseline: ``macs`` and the MACs point it stands beside;
            ``original int8``: ``original`` and 1.0).
        baseline: True for the uniform weight-only baseline.
        macs_fraction, params_fraction: the result's MACs and parameters over the original's.
        rel_error, worst: held-out relative error (worst output slice) and where it is.
        outputs: per output: name and held-out relative error.
        metric, metric_drop: the task metric on the result and its drop from the original's (when given).
        within_bound: the held-out numbers keep the bound (the policy's, else the default floor).
        speedup, speedup_p10, speedup_p90, reliable: measured onnxruntime speedup over the original.
        seconds: time to produce the model (factorize; for the baseline its rank search too).
        warnings: what factorize warned about (accuracy and speed), as lines.
        allocation: the resolved per-layer rules (convfactor's points).
        rank_fraction: the uniform baseline's rank fraction.
        quantized: ``"int8"`` for an int8 point (its speedup is against the float original), else None.
        quantize: how it was quantized (``QuantizeResult.to_dict``: mode, calibration samples, bits, sizes).
    """

    label: str
    kind: str
    fraction: float
    baseline: bool
    macs_fraction: float | None
    params_fraction: float
    rel_error: float
    worst: str | None
    outputs: list[dict[str, Any]]
    within_bound: bool
    metric: float | None = None
    metric_drop: float | None = None
    speedup: float | None = None
    speedup_p10: float | None = None
    speedup_p90: float | None = None
    reliable: bool | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    allocation: list[dict[str, Any]] | None = None
    rank_fraction: float | None = None
    quantized: str | None = None
    quantize: dict[str, Any] | None = None

    @property
    def convfactor(self) -> bool:
        """A model convfactor's allocation made (float or int8), not the baseline or the original."""
        return not self.baseline and self.kind != "original"

    def quality(self, higher_is_better: bool | None) -> float:
        """Larger is better: the metric (sign-adjusted) when measured, else minus the held-out error."""
        if self.metric is not None and higher_is_better is not None:
            return self.metric if higher_is_better else -self.metric
        return -self.rel_error

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measured_fields(record: dict[str, Any], speed: dict[str, Any] | None) -> dict[str, Any]:
    """``SweepPoint``'s measured fields from a held-out check ``record`` and a ``benchmark`` result (None: untimed)."""
    return {"rel_error": record["rel_error"], "worst": record.get("worst"),
            "outputs": [{"name": o["name"], "rel_error": o["rel_error"]} for o in record["outputs"]],
            "within_bound": bool(record["passed"]), "metric": record.get("metric"),
            "metric_drop": record.get("metric_drop"),
            "speedup": None if speed is None else round(speed["speedup"], 4),
            "speedup_p10": None if speed is None else round(speed["speedup_p10"], 4),
            "speedup_p90": None if speed is None else round(speed["speedup_p90"], 4),
            "reliable": None if speed is None else bool(speed["reliable"])}


def pareto_front(points: Sequence[SweepPoint], higher_is_better: bool | None) -> list[int]:
    """Indices of the points no other point beats on both speedup and quality (ties kept), by speedup."""
    front = []
    for i, p in enumerate(points):
        if p.speedup is None:
            continue
        beaten = any(q.speedup is not None and q.speedup >= p.speedup
                     and q.quality(higher_is_better) >= p.quality(higher_is_better)
                     and (q.speedup > p.speedup or q.quality(higher_is_better) > p.quality(higher_is_better))
                     for j, q in enumerate(points) if j != i)
        if not beaten:
            front.append(i)
    return sorted(front, key=lambda i: points[i].speedup)


@dataclass
class SweepResult:
    """The points of a sweep (convfactor's, then the baseline's), how they were measured, the shared work.

    Attributes:
        points: every measured point.
        models: {label: factorized module} (not in the JSON); an int8 point's is an ``OnnxModule`` running its
            int8 file in onnxruntime (``.save(path)`` writes it).
        metric_name, metric_original, higher_is_better: the task metric, when given.
        bound: the bound ``within_bound`` judged by (its dict form and text).
        data: the held-out samples every point was measured on.
        shared: phases computed once and reused (counts, seconds).
        bench: how speedups were timed (threads, runtime, cpu).
        seconds: the whole sweep.
        quantize: how the int8 points were made (options, calibration data), None without them.
    """

    points: list[SweepPoint]
    models: dict[str, nn.Module]
    bound: dict[str, Any]
    data: str
    shared: dict[str, Any]
    bench: dict[str, Any] | None
    seconds: float
    metric_name: str | None = None
    metric_original: float | None = None
    higher_is_better: bool | None = None
    quantize: dict[str, Any] | None = None

    @property
    def front(self) -> list[int]:
        """Indices (into ``points``) of the Pareto front of convfactor's points."""
        ours = [i for i, p in enumerate(self.points) if p.convfactor]
        return [ours[i] for i in pareto_front([self.points[i] for i in ours], self.higher_is_better)]

    def best(self) -> SweepPoint | None:
        """The fastest of convfactor's points (int8 ones included) within the bound (measured speedup; when not
        timed, the fewest MACs, a float point before its int8 form)."""
        kept = [p for p in self.points if p.convfactor and p.within_bound]
        if not kept:
            return None
        return max(kept, key=lambda p: (p.speedup if p.speedup is not None else 0.0, -(p.macs_fraction or 1.0),
                                        p.quantized is None))

    def to_dict(self) -> dict[str, Any]:
        best = self.best()
        return {"points": [p.to_dict() for p in self.points],
                "pareto_front": [self.points[i].label for i in self.front],
                "best": None if best is None else best.label, "bound": self.bound, "data": self.data,
                "metric": None if self.metric_name is None else {
                    "name": self.metric_name, "original": self.metric_original,
                    "higher_is_better": self.higher_is_better},
                "shared": self.shared, "bench": self.bench, "quantize": self.quantize,
                "seconds": round(self.seconds, 2)}

    def table(self) -> str:
        """The points as a text table (front marked ``*``, best ``>``)."""
        front, best = set(self.front), self.best()
        metric = self.metric_name is not None
        head = ["", "point", "MACs", "params", "held-out err", "worst slice"] + (["metric"] if metric else []) + \
            ["speedup", "bound", "seconds"]
        rows = [head]
        for i, p in enumerate(self.points):
            mark = (">" if p is best else "") + ("*" if i in front else "")
            speed = "n/a" if p.speedup is None else (f"{p.speedup:.2f}x ({p.speedup_p10:.2f}-{p.speedup_p90:.2f})"
                                                      + ("" if p.reliable else " noisy"))
            rows.append([mark, p.label, _fmt(p.macs_fraction), _fmt(p.params_fraction), f"{p.rel_error:.4g}",
                         str(p.worst or "")] + ([_fmt(p.metric, 4)] if metric else []) +
                        [speed, "kept" if p.within_bound else "NOT kept", f"{p.seconds:.1f}"])
        widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        notes = [f"held-out error and bound on {self.data}; bound: {self.bound.get('text')}; "
                 "* Pareto front of convfactor's points, > the fastest within the bound"]
        if metric:
            notes.append(f"metric {self.metric_name}: original {_fmt(self.metric_original, 4)} "
                         f"({'higher' if self.higher_is_better else 'lower'} is better)")
        if self.quantize is not None:
            notes.append(f"int8: {self.quantize['text']}; speedups against the float original")
        return "\n".join(lines + notes)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"
