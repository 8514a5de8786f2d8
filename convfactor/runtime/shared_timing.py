"""Several ONNX models timed together against one reference: one shared reference latency for all.

``benchmark`` compares two models in pairs; a table of several candidates built from separate pairs has
one reference timing per row, so its latency and speedup columns disagree. Here every model runs once
per round, the order rotating from round to round so that no model always runs first, and each speedup
is the reference's median over the candidate's median: a reader can check it from the printed times.
The per-round ratios give each speedup's spread; when one spreads over more than ``NOISE_LIMIT`` of its
median, all models are timed again for longer (``remeasure`` times at most) and the steadiest kept.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..inputs import standard_normal_inputs
from .benchmarking import NOISE_LIMIT, TimingStats
from .sessions import make_session, run_checked, session_feeds

__all__ = ["SharedTiming", "time_together"]


@dataclass(frozen=True)
class SharedTiming:
    """Medians of every model from the same rounds; the first name is the reference.

    Attributes:
        names: the models, reference first.
        stats: each model's run times.
        ratio_spread: for each candidate, the p10 and p90 of its per-round ratios reference / candidate.
        rounds: timed rounds (one run of every model each).
        remeasured: how many times all models were timed again because a spread was too wide.
    """

    names: tuple[str, ...]
    stats: dict[str, TimingStats]
    ratio_spread: dict[str, tuple[float, float]]
    rounds: int
    seconds: float
    remeasured: int = 0

    def speedup(self, name: str) -> float:
        """The reference's median time over ``name``'s."""
        return self.stats[self.names[0]].median_ms / self.stats[name].median_ms

    def reliable(self, name: str) -> bool:
        """False when ``name``'s per-round ratios spread over more than ``NOISE_LIMIT`` of its speedup."""
        if name == self.names[0]:
            return True
        p10, p90 = self.ratio_spread[name]
        return (p90 - p10) / self.speedup(name) <= NOISE_LIMIT

    def worst_spread(self) -> float:
        return max(((p90 - p10) / self.speedup(n) for n, (p10, p90) in self.ratio_spread.items()), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.names[0], "rounds": self.rounds, "seconds": self.seconds,
                "remeasured": self.remeasured,
                "models": {n: {**self.stats[n].to_dict(), "speedup": self.speedup(n), "reliable": self.reliable(n),
                               "ratio_p10": self.ratio_spread.get(n, (1.0, 1.0))[0],
                               "ratio_p90": self.ratio_spread.get(n, (1.0, 1.0))[1]} for n in self.names}}


def time_together(
    paths: Mapping[str, str | os.PathLike],
    input_shape: Sequence[int],
    *,
    threads: int = 1,
    warmup: int = 5,
    repeats: int = 30,
    min_time: float = 1.0,
    remeasure: int = 2,
    seed: int = 0,
) -> SharedTiming:
    """Time ONNX models in rotating rounds on the same standard-normal input.

    Args:
        paths: name -> ONNX file; the first is the reference the speedups are relative to.
        input_shape: the input's shape, batch first.
        threads: onnxruntime intra-op threads.
        warmup: untimed runs of each model first.
        repeats: minimum rounds.
        min_time: keep timing rounds until this many seconds have passed.
        remeasure: at most this many more timings, with twice the rounds and time each, while a speedup
            spreads over more than ``NOISE_LIMIT`` of its median; the steadiest timing is kept.
        seed: seed of the input.
    Returns:
        The ``SharedTiming``.
    """
    names = tuple(paths)
    inputs = standard_normal_inputs([input_shape], seed=seed)
    sessions = [make_session(paths[n], threads=threads) for n in names]
    feeds = [session_feeds(s, inputs) for s in sessions]
    for session, feed, name in zip(sessions, feeds, names):
        run_checked(session, feed, name)
        for _ in range(warmup):
            session.run(None, feed)
    best = _rounds(names, sessions, feeds, repeats, min_time)
    tries = 0
    while best.worst_spread() > NOISE_LIMIT and tries < remeasure:
        tries += 1
        again = _rounds(names, sessions, feeds, repeats * 2**tries, min_time * 2**tries)
        if again.worst_spread() < best.worst_spread():
            best = again
    return SharedTiming(best.names, best.stats, best.ratio_spread, best.rounds, best.seconds, tries)


def _rounds(names: tuple[str, ...], sessions: list, feeds: list, repeats: int, min_time: float) -> SharedTiming:
    clock = time.perf_counter
    times: list[list[float]] = [[] for _ in names]
    started = clock()
    count = 0
    while count < repeats or clock() - started < min_time:
        shift = count % len(names)
        for index in list(range(shift, len(names))) + list(range(shift)):
            start = clock()
            sessions[index].run(None, feeds[index])
            times[index].append(clock() - start)
        count += 1
    seconds = clock() - started
    reference = np.asarray(times[0])
    spread = {}
    for name, row in zip(names[1:], times[1:]):
        p10, p90 = np.percentile(reference / np.asarray(row), [10, 90])
        spread[name] = (float(p10), float(p90))
    stats = {name: TimingStats.of(row) for name, row in zip(names, times)}
    return SharedTiming(names, stats, spread, count, seconds)
