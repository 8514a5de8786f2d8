"""Interleaved timing of a few variants on one input: the loop both latency runtimes share."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .latency_options import LatencyOptions

__all__ = ["round_robin"]


def round_robin(runs: Sequence[Callable[[], Any]], options: LatencyOptions,
                 synchronize: Callable[[], None] | None = None) -> list[float]:
    """Median ms of ``runs[1:]`` minus that of ``runs[0]`` (the overhead), timed interleaved round-robin.

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
    medians = [float(np.median(t)) * 1e3 for t in times]
    overhead = medians[0]
    # A floor keeps every time positive (cost 0 would make a replacement look free).
    return [max(m - overhead, 1e-4) for m in medians[1:]]
