"""``AutoOptions.time_budget`` as a clock the refinement phases consult.

Statistics, candidates, the allocation and one build of the returned model always run; the phases that
only refine (sensitivity probes, fidelity bisection rounds, the sequential refit) ask ``spent()`` before
each step and, when the budget is gone, stop and record one warning line naming the phase, what was
cut and the time (``report.warnings``).
"""

from __future__ import annotations

import time

__all__ = ["Deadline"]


class Deadline:
    """A time budget started at construction (None: never spent).

    Example:
        >>> clock = Deadline(60.0)
        >>> if clock.spent():
        ...     clock.cut("sensitivity probes", "after 3 of 7 layers")
    """

    def __init__(self, seconds: float | None, started: float | None = None):
        if seconds is not None and not seconds > 0:
            raise ValueError(f"time_budget must be a positive number of seconds, got {seconds!r}")
        self.seconds = seconds
        self.started = time.perf_counter() if started is None else started
        self.warnings: list[str] = []
        self._phases: set[str] = set()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def spent(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds

    def cut(self, phase: str, what: str) -> None:
        """Record (once per phase) that ``phase`` was cut short: ``what`` says how."""
        if phase in self._phases:
            return
        self._phases.add(phase)
        self.warnings.append(f"time budget {self.seconds:g} s spent after {self.elapsed():.1f} s: "
                             f"{phase} {what}")
