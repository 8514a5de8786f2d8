"""``sweep(model, targets, ...)``: several targets of one network, the shared work done once, each point measured.

    targets -> for each: factorize(model, policy + target, shared=work)   (statistics, candidates and
               sensitivities computed by the first point of each kind, reused by the others)
            -> uniform baseline at each MACs point (one method, one rank fraction, weights only:
               ``convfactor.sweeps.uniform``)
            -> every model measured on the same held-out samples and timed against the original
            -> with quantize="int8": each convfactor point and the original also in int8, measured the same
               way (``convfactor.sweeps.quantized``)

Each point is the model ``factorize`` returns for that target alone (``SharedWork`` reuses only what does
not depend on the fraction), so a point can be reproduced with ``convert --target``. With an executor
(``convfactor.executor``) the first point of each kind runs here with its scoring and probes as tasks; the
other MACs/params points are then tasks themselves when the executor runs them in other processes (each
carries the shared work; where the model or metric cannot be pickled they run here). Latency points always
run here: their timings must not share the machine with other points. Every model is measured here, one
after the other, after all are built.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from ..api import factorize, get_report
from ..auto.options import AutoOptions
from ..auto.search.verify import DEFAULT_FLOOR, ConvfactorWarning
from ..auto.shared import SharedWork
from ..errors import ConvfactorError
from ..executor import in_this_process
from ..inputs import as_input_tuple
from ..metric import Metric, as_metric
from ..policy import AUTO, Policy, Rule
from ..progress import open_bar
from .measure import PointMeter
from .points import Target, first_of_each_kind, parse_targets
from .quantized import describe, int8_label, int8_options, int8_point, original_point
from .result import SweepPoint, SweepResult, measured_fields
from .uniform import UniformPlanner, uniform_model

__all__ = ["sweep", "DEFAULT_BASELINE"]

DEFAULT_BASELINE = "spatial_svd"
BENCH_KEYS = ("threads", "min_time", "repeats", "warmup", "remeasure", "exporter", "graph_optimization")


def sweep(
    model: nn.Module,
    targets: Sequence[Target | tuple[str, float] | str] | str,
    example_inputs: Any,
    *,
    policy: Policy | Mapping | str | None = None,
    calibration: Any = None,
    validation: Any = None,
    metric: Callable[[nn.Module], float] | Metric | None = None,
    latency: Mapping[str, Any] | None = None,
    auto_options: AutoOptions | None = None,
    baseline: str | None = DEFAULT_BASELINE,
    bench: Mapping[str, Any] | None = None,
    executor: Any = None,
    progress: bool | str = False,
    factorize_options: Mapping[str, Any] | None = None,
    quantize: str | None = None,
    quantize_options: Mapping[str, Any] | None = None,
) -> SweepResult:
    """Factorize ``model`` at each target, sharing the expensive work, and measure every point.

    Args:
        model: the trained network (not modified).
        targets: ``Target``s, ``(kind, fraction)`` pairs, or strings as the CLI takes them
            (``["macs=0.7,0.5", "latency=0.8"]``).
        example_inputs: tensor(s) the model runs on (MACs, layer shapes, the timed batch).
        policy: rules and fidelity bound every point shares (its target is replaced per point);
            None: ``method: auto`` on every layer.
        calibration, validation, metric, latency, auto_options: as for ``factorize``.
        baseline: the method of the uniform weight-only baseline at each MACs point, or None.
        bench: ``benchmark`` options for the speedups (``BENCH_KEYS``; default 1 thread, 1 s, 30 pairs);
            ``{"skip": True}`` leaves the points untimed.
        executor: a ``concurrent.futures.Executor`` (``convfactor.executor``); None: serial.
        progress: a bar (or ``"lines"``) across points with an ETA.
        factorize_options: other ``factorize`` keywords every point gets (``fold_batchnorm``, ``leaf_modules``...).
        quantize: ``"int8"``: each convfactor point and the original also quantized by onnxruntime (as
            ``convert --quantize int8``: static QDQ calibrated on the fit and select samples, dynamic without
            calibration data) and measured as their own points (``macs=0.5 int8``, ``original int8``); the
            speedups are against the float original. None: float points only.
        quantize_options: ``calibrate_method`` (minmax, entropy, percentile) and ``keep_float`` (op types or
            node names left in float), as ``convert``'s ``--calibrate-method``/``--keep-float``.
    Returns:
        A ``SweepResult`` (``table()``, ``to_dict()``, ``best()``, ``models``; ``plot_sweep`` draws it).
    Raises:
        ConvfactorError: a bad target or argument, before any work.
    """
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise ConvfactorError(f"sweep needs an nn.Module, got {type(model).__name__}")
    points = _targets(targets)
    inputs = as_input_tuple(example_inputs, allow_none=True)
    if inputs is None:
        raise ConvfactorError("sweep needs example_inputs (MACs, the layers' shapes and the timed batch)")
    base = Policy.from_any(policy) if policy is not None else Policy(rules=(Rule(method=AUTO, match="*"),))
    metric = as_metric(metric)
    if base.bound is not None and base.bound.needs_metric and metric is None:
        raise ConvfactorError("sweep: the policy's max_metric_drop/min_metric needs metric=... (CLI: --metric)")
    opts = auto_options or AutoOptions()
    bench_options = _bench_options(bench)
    int8 = int8_options(quantize, quantize_options)
    extra = dict(factorize_options or {})
    original = copy.deepcopy(model).eval()  # measured against; the caller's model keeps its mode and state
    meter = PointMeter(original, inputs, calibration, validation, metric, base.fidelity, base.bound, opts,
                       bench_options)
    work = SharedWork()
    common = dict(calibration=calibration, validation=validation, metric=metric, latency=latency,
                  auto_options=opts, **extra)
    uniform = [t for t in points if t.kind == "macs"] if baseline else []
    total = len(points) + len(uniform)
    bar = open_bar(progress, "sweep", total=total, unit="point")
    built: dict[int, tuple[nn.Module, float]] = {}
    try:
        first = first_of_each_kind(points)
        for index in first:  # computes the shared work, its tasks on the executor
            built[index] = _point(model, base, points[index], inputs, common, work, executor)
            _advance(bar, points[index].label)
        if metric is not None:  # the value every point's drop was measured from, evaluated once
            meter.metric_original = work.metric_value(metric)
        rest = [i for i in range(len(points)) if i not in built]
        remote = [] if in_this_process(executor) or not _picklable((model, common)) else \
            [i for i in rest if points[i].kind != "latency"]
        futures = {i: executor.submit(_point, model, base, points[i], inputs, common, work, None) for i in remote}
        for index in rest:
            if index in futures:
                built[index] = futures[index].result()
            else:
                built[index] = _point(model, base, points[index], inputs, common, work, executor)
            _advance(bar, points[index].label)
        measured = []
        for index, target in enumerate(points):
            fast, seconds = built.pop(index)
            onnx = meter.export(fast) if int8 is not None else None  # timed from it, quantized from it
            point = _measure(meter, fast, target.label, target, seconds, baseline=False, timed_from=onnx)
            measured.append((point, fast))
            if int8 is not None:
                measured.append(_measure_int8(meter, point, onnx, int8))
        if int8 is not None:
            measured.append(_measure_int8(meter, original_point(0.0), meter.original_onnx(), int8))
        planner = UniformPlanner(model, inputs, extra) if uniform else None
        for target in uniform:
            tick = time.perf_counter()
            fast, rank = uniform_model(model, baseline, target.fraction, inputs, extra, planner)
            point = _measure(meter, fast, f"uniform {baseline} r={rank:.3g}", target, time.perf_counter() - tick,
                             baseline=True)
            point.rank_fraction = round(rank, 4)
            measured.append((point, fast))
            _advance(bar, point.label)
    finally:
        bar.close()
        meter.close()
    result = SweepResult(
        points=[p for p, _ in measured], models={p.label: m for p, m in measured},
        bound={**(meter.bound.to_dict() if meter.bound is not None else {}), "text": _bound_text(meter)},
        data=meter.data, shared={"computed": dict(work.counts), "seconds": {k: round(v, 2) for k, v in
                                                                           work.seconds.items()},
                                 "points": len(points)},
        bench=None if bench_options is None else {**bench_options, "runtime": "onnxruntime"},
        seconds=time.perf_counter() - started,
        quantize=None if int8 is None else describe(int8, meter.int8_calibration, meter.data))
    if metric is not None:
        result.metric_name, result.higher_is_better = metric.name, metric.higher_is_better
        result.metric_original = meter.checker.metric_original
    return result


def _targets(targets: Any) -> list[Target]:
    """``Target``s from strings (``macs=0.7,0.5``), pairs or ``Target``s, checked by ``parse_targets``."""
    if isinstance(targets, str):
        targets = targets.split()
    texts = [f"{t.kind}={t.fraction!r}" if isinstance(t, Target) else
             f"{t[0]}={t[1]!r}" if isinstance(t, tuple) and len(t) == 2 else str(t) for t in targets]
    return parse_targets(texts, flag="sweep targets")


def _bench_options(bench: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if bench is not None and bench.get("skip"):
        return None
    unknown = sorted(set(bench or {}) - set(BENCH_KEYS))
    if unknown:
        raise ConvfactorError(f"sweep: unknown bench option(s) {', '.join(unknown)} (known: skip, "
                              f"{', '.join(BENCH_KEYS)})")
    options = {"threads": 1, "min_time": 1.0, "repeats": 30, "warmup": 5}
    options.update(bench or {})
    if isinstance(options["threads"], Iterable):
        raise ConvfactorError("sweep: bench threads is one thread count (each point is timed at it)")
    return options


def _picklable(value: Any) -> bool:
    """Whether worker processes can receive ``value`` (a metric defined inside a function cannot: its points
    then run here)."""
    try:
        pickle.dumps(value)
    except Exception:  # noqa: BLE001 - any pickling failure means the same: keep the work here
        return False
    return True


def _point(model: nn.Module, base: Policy, target: Target, inputs: tuple, common: dict[str, Any],
           work: SharedWork, executor: Any) -> tuple[nn.Module, float]:
    """The model ``factorize`` returns for ``target`` alone (the shared work reused), and its seconds."""
    tick = time.perf_counter()
    policy = dataclasses.replace(base, target=(target.kind, target.fraction))
    with warnings.catch_warnings():  # in the point's record (``SweepPoint.warnings``), wherever it ran
        warnings.simplefilter("ignore", ConvfactorWarning)
        fast = factorize(model, policy, inputs, shared=work, executor=executor, **common)
    return fast, time.perf_counter() - tick


def _measure(meter: PointMeter, fast: nn.Module, label: str, target: Target, seconds: float,
             baseline: bool, timed_from: Any = None) -> SweepPoint:
    report = get_report(fast)
    record = meter.fidelity(fast, None if baseline else report.extra.get("fidelity_check"))
    speed = meter.speed(fast if timed_from is None else timed_from, label)
    resolved = (report.policy.get("resolved") or {}).get("rules") if isinstance(report.policy, dict) else None
    return SweepPoint(
        label=label, kind=target.kind, fraction=target.fraction, baseline=baseline,
        macs_fraction=None if not report.macs_before else round(report.macs_after / report.macs_before, 4),
        params_fraction=round(report.params_after / report.params_before, 4),
        **measured_fields(record, speed), seconds=round(seconds, 2),
        warnings=[str(w) for w in report.all_warnings()], allocation=resolved)


def _measure_int8(meter: PointMeter, point: SweepPoint, onnx: Any, options: dict[str, Any]) -> tuple[SweepPoint, Any]:
    """The int8 form of ``point`` (its float ONNX file ``onnx``) measured as every point is, and its module."""
    label = int8_label(point.label)
    module, quantized = meter.quantize(onnx, label, options)
    record = meter.fidelity(module)
    speed = meter.speed(quantized["path"], label)
    return int8_point(point, record, speed, quantized), module


def _bound_text(meter: PointMeter) -> str:
    return meter.bound.describe() if meter.bound is not None else f"default floor: {DEFAULT_FLOOR.describe()}"


def _advance(bar: Any, label: str) -> None:
    bar.set_postfix(point=label)
    bar.update()
