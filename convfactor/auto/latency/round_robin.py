"""Interleaved timing of a few variants on one input: the loop both latency runtimes share.

Times are each variant's minus the empty variant's (the call overhead: feeding the input, the
neighbours). A layer whose time is below ``RESOLUTION`` of that overhead cannot be told from noise
(PP-OCR det's 1x1 48->12 conv at 80x80 can read 0.0001 ms beside replacements at 0.01-0.08 ms: ratios of
100-800 that mean nothing). Such times read as the floor, ``Timings.floor`` says which value that is,
and callers treat a layer at the floor as unresolved.

Each variant's time is the fastest decile of its runs (``QUANTILE``), not the median: on a machine
shared with other jobs a run is interrupted more often the longer it is, so medians grow with a run's
length (a dense 3x3 conv of ResNet-18 read 4.8-6.8 ms where its fast runs took 2-2.7 ms, while its
0.1-0.4 ms replacements barely moved), which overstates the savings of replacing long layers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .options import LatencyOptions

__all__ = ["QUANTILE", "RESOLUTION", "Timings", "round_robin", "fast_time"]

QUANTILE = 10  # percent: the time of a run the machine's other jobs did not slow down
RESOLUTION = 0.05  # of the call overhead: a variant's time below it is noise (reads as the floor)


class Timings(list):
    """Milliseconds per variant; ``floor``: the value a time below the resolution reads as."""

    def __init__(self, times: Sequence[float], floor: float):
        super().__init__(times)
        self.floor = floor


def fast_time(seconds: Sequence[float]) -> float:
    """The ``QUANTILE`` percentile of some runs' durations, in ms."""
    return float(np.percentile(np.asarray(seconds, dtype=float), QUANTILE)) * 1e3


def round_robin(runs: Sequence[Callable[[], Any]], options: LatencyOptions,
                 synchronize: Callable[[], None] | None = None) -> Timings:
    """ms of ``runs[1:]`` minus that of ``runs[0]`` (the overhead), timed interleaved round-robin (``fast_time``).

    Args:
        runs: zero-argument calls, the first one the empty (Identity) variant; already warmed up.
        options: repeats and max_seconds_per_layer.
        synchronize: called before starting and before stopping the clock (CUDA's asynchronous launches).
    """
    sync = synchronize or (lambda: None)
    times: list[list[float]] = [[] for _ in runs]
    started = time.perf_counter()
    for round_index in range(options.repeats):
        # Rotate the order each round so drift and cache effects spread evenly over the variants.
        shift = round_index % len(runs)
        for i in list(range(shift, len(runs))) + list(range(shift)):
            sync()
            t0 = time.perf_counter()
            runs[i]()
            sync()
            times[i].append(time.perf_counter() - t0)
        if round_index >= 2 and time.perf_counter() - started > options.max_seconds_per_layer:
            break
    fast = [fast_time(t) for t in times]
    overhead = fast[0]
    # A floor keeps every time positive (cost 0 would make a replacement look free) and marks what the
    # overhead's own noise hides.
    floor = max(RESOLUTION * overhead, 1e-4)
    return Timings([max(m - overhead, floor) for m in fast[1:]], floor)
