"""Latency of the original and the factorized model side by side in onnxruntime (CPU).

Both models run in the same process on the same inputs. After warm-up they are timed in pairs, A then
B, then B then A for the next pair, so that drift in clock speed or cache state hits both alike. The
speedup is the median of the per-pair ratios ``t_original / t_factorized``, which is steadier than
the ratio of medians. Each thread setting is measured separately (by default 1 thread and all the
cores this process may use).

A speedup is only as good as the machine was quiet: when the per-pair ratios spread over more than
``NOISE_LIMIT`` of their median (p10 to p90), the pairs are timed again with twice the pairs and twice
the time (``remeasure`` times at most) and the steadiest measurement is kept; if it is still that noisy,
the result is marked not reliable and no speedup figure is printed for it.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from torch import nn

from ..errors import InputSpecError
from ..inputs import numpy_inputs
from ..progress import open_bar
from ..tables import format_grid
from .cpu import cpu_model
from .sessions import (
    make_session,
    prepare_onnx,
    run_checked,
    session_feeds,
)

__all__ = ["TimingStats", "ThreadResult", "BenchmarkReport", "benchmark", "cpu_model", "available_cores",
           "NOISE_LIMIT"]

# (p90 - p10) / median of the per-pair speedups above which the machine was too noisy to tell.
NOISE_LIMIT = 0.5


@dataclass(frozen=True)
class TimingStats:
    """Summary of one model's run times, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> TimingStats:
        """Statistics of run times given in seconds."""
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        p10, median, p90 = np.percentile(ms, [10, 50, 90])
        return cls(float(median), float(p10), float(p90), float(ms.mean()), float(ms.min()), int(ms.size))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ThreadResult:
    """Both models at one intra-op thread count.

    Attributes:
        speedup: median over pairs of ``t_original / t_factorized`` (> 1: the factorized model is faster).
        speedup_p10, speedup_p90: spread of the per-pair ratios.
        pairs: timed pairs (one run of each model per pair).
        seconds: wall time of the timed pairs.
        remeasured: how many times the pairs were timed again because the spread was too wide.
    """

    threads: int
    original: TimingStats
    factorized: TimingStats
    speedup: float
    speedup_p10: float
    speedup_p90: float
    pairs: int
    seconds: float
    remeasured: int = 0

    @property
    def spread(self) -> float:
        """(p90 - p10) / median of the per-pair speedups: 0 on a perfectly quiet machine."""
        return (self.speedup_p90 - self.speedup_p10) / self.speedup if self.speedup > 0 else math.inf

    @property
    def reliable(self) -> bool:
        """False when the spread exceeds ``NOISE_LIMIT``: the speedup figure says nothing."""
        return self.spread <= NOISE_LIMIT

    def speedup_text(self) -> str:
        """``1.52x (1.48-1.57)``, or ``not reliable (0.18-13.98x, machine too noisy)``."""
        span = f"{self.speedup_p10:.2f}-{self.speedup_p90:.2f}"
        return f"{self.speedup:.2f}x ({span})" if self.reliable else f"not reliable ({span}x, machine too noisy)"

    def to_dict(self) -> dict[str, Any]:
        return {"threads": self.threads, "original": self.original.to_dict(),
                "factorized": self.factorized.to_dict(), "speedup": self.speedup,
                "speedup_p10": self.speedup_p10, "speedup_p90": self.speedup_p90, "pairs": self.pairs,
                "seconds": self.seconds, "spread": self.spread, "reliable": self.reliable,
                "remeasured": self.remeasured}


@dataclass(frozen=True)
class BenchmarkReport:
    """Latency of both models per thread setting, and the machine they ran on."""

    results: tuple[ThreadResult, ...]
    input_shapes: tuple[tuple[int, ...], ...]
    inputs_generated: bool
    graph_optimization: str
    warmup: int
    repeats: int
    min_time: float
    onnxruntime_version: str
    cpu_model: str
    logical_cores: int
    available_cores: int
    platform: str
    models: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return {
            "results": [r.to_dict() for r in self.results],
            "input_shapes": [list(s) for s in self.input_shapes],
            "inputs_generated": self.inputs_generated,
            "graph_optimization": self.graph_optimization,
            "warmup": self.warmup,
            "repeats": self.repeats,
            "min_time": self.min_time,
            "onnxruntime_version": self.onnxruntime_version,
            "cpu_model": self.cpu_model,
            "logical_cores": self.logical_cores,
            "available_cores": self.available_cores,
            "platform": self.platform,
            "models": self.models,
        }

    def render(self) -> str:
        """A readable table: one row per thread setting."""
        shapes = ", ".join(str(list(s)) for s in self.input_shapes)
        lines = [
            f"onnxruntime {self.onnxruntime_version} CPU, graph optimization {self.graph_optimization}; "
            f"{self.cpu_model}, {self.available_cores} of {self.logical_cores} cores available",
            f"inputs {shapes}; original and factorized interleaved in pairs, {self.warmup} warm-up runs each, "
            f"then medians over >= {self.repeats} pairs and >= {self.min_time:g} s",
        ]
        lines += format_grid(["threads", "original ms (p10-p90)", "factorized ms (p10-p90)", "speedup (p10-p90)",
                              "pairs"],
                             [[str(r.threads), _span(r.original), _span(r.factorized), r.speedup_text(), str(r.pairs)]
                              for r in self.results], left=0)
        if any(not r.reliable for r in self.results):
            lines.append(f"not reliable: the per-pair speedups spread over more than {NOISE_LIMIT:.0%} of their "
                         f"median even after timing again for longer; rerun on a quieter machine")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def benchmark(
    original: nn.Module | str | os.PathLike,
    factorized: nn.Module | str | os.PathLike,
    example_inputs: Any = None,
    *,
    input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
    threads: int | Sequence[int] | None = None,
    graph_optimization: str = "all",
    warmup: int = 10,
    repeats: int = 50,
    min_time: float = 1.0,
    progress: bool = True,
    seed: int = 0,
    exporter: str = "auto",
    workdir: str | os.PathLike | None = None,
    remeasure: int = 2,
) -> BenchmarkReport:
    """Time the original and the factorized model, interleaved, at each thread setting.

    Args:
        original, factorized: modules (exported to ONNX here) or paths to ``.onnx`` files.
        example_inputs: the batch to run (a tensor, or a tuple for several inputs); or None with
            ``input_shape``, for standard-normal inputs.
        input_shape: shape of each input, batch axis first, e.g. ``(1, 3, 224, 224)``.
        threads: intra-op thread counts to measure; None: 1 and the number of available cores.
        graph_optimization: onnxruntime level: ``"disabled"``, ``"basic"``, ``"extended"`` or ``"all"``.
        warmup: untimed runs of each model before timing, per thread setting.
        repeats: minimum number of timed pairs per thread setting.
        min_time: keep timing pairs until at least this many seconds have passed (per thread setting).
        progress: show a tqdm progress bar (only when stderr is a terminal).
        seed: seed of the generated inputs.
        exporter: ``"auto"``, ``"dynamo"`` or ``"torchscript"`` (see ``export_onnx``).
        workdir: where exported files go (default: a temporary directory, removed afterwards).
        remeasure: at most this many more timings, each with twice the pairs and time of the last, when
            the speedups spread over more than ``NOISE_LIMIT`` of their median; the steadiest is kept.
    Returns:
        A ``BenchmarkReport``.
    Raises:
        InputSpecError: no inputs, or invalid counts.
        ExportError: a module could not be exported.
    """
    if warmup < 0 or repeats < 1 or min_time < 0:
        raise InputSpecError(f"need warmup >= 0, repeats >= 1, min_time >= 0; got {warmup}, {repeats}, {min_time}")
    settings = _thread_settings(threads)
    inputs = numpy_inputs(example_inputs, input_shape, seed)
    generated = example_inputs is None

    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="convfactor-benchmark-") as scratch:
        directory = scratch if workdir is None else workdir
        models = {
            "original": prepare_onnx(original, inputs, directory, "original", exporter=exporter),
            "factorized": prepare_onnx(factorized, inputs, directory, "factorized", exporter=exporter),
        }
        results = []
        for count in settings:
            sessions = [make_session(models[role].path, threads=count, graph_optimization=graph_optimization)
                        for role in ("original", "factorized")]
            results.append(_steadiest(sessions, inputs, count, warmup, repeats, min_time, progress, remeasure))

    return BenchmarkReport(
        results=tuple(results),
        input_shapes=tuple(tuple(a.shape) for a in inputs),
        inputs_generated=generated,
        graph_optimization=graph_optimization,
        warmup=warmup,
        repeats=repeats,
        min_time=min_time,
        onnxruntime_version=ort.__version__,
        cpu_model=cpu_model(),
        logical_cores=os.cpu_count() or 1,
        available_cores=available_cores(),
        platform=platform.platform(),
        models={role: model.to_dict(kept=workdir is not None) for role, model in models.items()},
    )


def _time_pairs(sessions: list, inputs: tuple[np.ndarray, ...], threads: int, warmup: int, repeats: int,
                min_time: float, progress: bool) -> ThreadResult:
    """Warm up, then time (A, B), (B, A), ... until ``repeats`` pairs and ``min_time`` seconds."""
    feeds = [session_feeds(session, inputs) for session in sessions]
    for session, feed, role in zip(sessions, feeds, ("the original", "the factorized model")):
        run_checked(session, feed, role)  # a clear error if the inputs do not fit, before timing
    runs = [_runner(session, feed) for session, feed in zip(sessions, feeds)]
    for _ in range(warmup):
        for run in runs:
            run()

    show = progress and sys.stderr.isatty()
    times: list[list[float]] = [[], []]
    bar = open_bar(show, f"benchmark, {threads} thread(s)", total=repeats, unit="pair")
    started = time.perf_counter()
    try:
        while True:
            order = (0, 1) if len(times[0]) % 2 == 0 else (1, 0)
            for index in order:
                times[index].append(runs[index]())
            bar.update(1)
            elapsed = time.perf_counter() - started
            done = len(times[0])
            if done >= repeats and elapsed >= min_time:
                break
            if done == repeats or (done % 10 == 0 and done > repeats):
                # Re-estimate how many pairs min_time needs, so the bar's total stays honest.
                bar.total = max(repeats, math.ceil(min_time / (elapsed / done)))
                bar.refresh()
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    ratios = np.asarray(times[0]) / np.asarray(times[1])
    p10, median, p90 = np.percentile(ratios, [10, 50, 90])
    return ThreadResult(threads, TimingStats.of(times[0]), TimingStats.of(times[1]), float(median),
                        float(p10), float(p90), len(ratios), seconds)


def _steadiest(sessions: list, inputs: tuple[np.ndarray, ...], threads: int, warmup: int, repeats: int,
               min_time: float, progress: bool, remeasure: int) -> ThreadResult:
    """Time the pairs; while the spread is too wide, time again with twice the pairs and time (at most
    ``remeasure`` times, no warm-up: the sessions are warm) and keep the steadiest measurement."""
    best = _time_pairs(sessions, inputs, threads, warmup, repeats, min_time, progress)
    tries = 0
    while not best.reliable and tries < remeasure:
        tries += 1
        again = _time_pairs(sessions, inputs, threads, 0, repeats * 2**tries, min_time * 2**tries, progress)
        if again.spread < best.spread:
            best = again
    return replace(best, remeasured=tries)


def _runner(session, feeds: dict[str, np.ndarray]):
    """A function that runs the session once and returns its wall time in seconds."""
    clock = time.perf_counter

    def run() -> float:
        start = clock()
        session.run(None, feeds)
        return clock() - start

    return run


def _thread_settings(threads: int | Sequence[int] | None) -> list[int]:
    if threads is None:
        return sorted({1, available_cores()})
    counts = [threads] if isinstance(threads, int) else list(threads)
    if not counts or any(not isinstance(c, int) or c < 1 for c in counts):
        raise InputSpecError(f"threads must be positive ints, got {threads!r}")
    return list(dict.fromkeys(counts))


def available_cores() -> int:
    """Logical CPUs this process may run on (respects affinity masks and container cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _span(stats: TimingStats) -> str:
    return f"{stats.median_ms:.3f} ({stats.p10_ms:.3f}-{stats.p90_ms:.3f})"
