"""The one progress helper: the phase name, a count and an ETA on stderr (tqdm bars), or nothing.

    for layer in track(layers, enabled, "candidates"):
        ...
    with phase(enabled, "allocation", total=1) as bar:
        ...; bar.update()

Phases of ``factorize`` with a target or ``method: auto``: statistics (calibration batches),
candidates (layers), sensitivities (layers), allocation, refit (layers), latency check.
Disabled bars cost nothing and print nothing, so callers pass their ``progress`` flag straight in.
Nothing else in convfactor imports tqdm: every wait goes through ``track`` or ``phase``.
``progress="lines"`` (what the CLI passes when stderr is a log or a pipe, not a terminal) prints plain
lines instead of redrawn bars: one when a phase starts, then at most one every ``LINE_INTERVAL`` seconds
with the count, elapsed time and ETA, and one when it ends.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["track", "phase", "open_bar", "say", "LINE_INTERVAL"]

T = TypeVar("T")
_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}]"


LINE_INTERVAL = 30.0


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class _Lines:
    """A tqdm-like counter that prints plain lines to stderr (for logs): start, every interval, end."""

    def __init__(self, name: str, total: int | None, unit: str, interval: float = LINE_INTERVAL):
        import time

        self._time, self._file = time.monotonic, sys.stderr
        self.name, self.total, self.unit, self.interval = name, total, unit, interval
        self.n, self.started, self.postfix = 0, self._time(), ""
        self._last = self.started
        self._say(f"{name}: started" + ("" if total is None else f" ({total} {_plural(unit, total)})"))

    def _say(self, text: str) -> None:
        print(text, file=self._file, flush=True)

    def _line(self) -> str:
        elapsed = self._time() - self.started
        count = f"{self.n}" if self.total is None else f"{self.n}/{self.total}"
        eta = ""
        if self.total and 0 < self.n < self.total:
            eta = f", ETA {_clock(elapsed / self.n * (self.total - self.n))}"
        unit = _plural(self.unit, self.total or self.n)
        return f"{self.name}: {count} {unit} [{_clock(elapsed)} elapsed{eta}{self.postfix}]"

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._time() - self._last >= self.interval:
            self._last = self._time()
            self._say(self._line())

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the count (tqdm's ``set_postfix``), e.g. ``loss=0.12``."""
        self.postfix = "".join(f", {k}={v}" for k, v in values.items())

    def refresh(self) -> None:
        """Nothing to redraw: the next periodic line shows a changed ``total``."""

    def close(self, finished: bool = True) -> None:
        """The last line: ``done`` when the phase finished, ``stopped`` when an error or Ctrl-C ended it."""
        self._say(self._line().replace("]", ", done]" if finished else ", stopped]", 1))


def _plural(unit: str, count: int) -> str:
    """``batch`` -> ``batches``, ``layer`` -> ``layers``; the unit itself for a count of 1."""
    if count == 1:
        return unit
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


def _close(bar: Any, finished: bool) -> None:
    """Close a bar; a line-printing one says ``stopped`` rather than ``done`` when the phase was cut short."""
    if isinstance(bar, _Lines):
        bar.close(finished)
    else:
        bar.close()


def open_bar(enabled: bool | str, name: str, total: int | None = None, unit: str = "step") -> Any:
    """A bar to ``update()`` and ``close()`` by hand (``phase`` closes it for you).

    It takes ``bar.total = n`` with ``bar.refresh()`` (a re-estimated length) and
    ``bar.set_postfix(loss=...)`` in every mode: a tqdm bar (``True``), plain lines (``"lines"``) or a
    disabled bar that prints nothing (``False``).
    """
    from tqdm.auto import tqdm

    if enabled == "lines":
        return _Lines(name, total, unit)

    return tqdm(total=total, desc=name, unit=unit, leave=False, disable=not enabled, bar_format=None
                if total is None else "{desc}: {percentage:3.0f}%|{bar:20}| " + _FORMAT.split(": ", 1)[1])


def track(items: Iterable[T], enabled: bool | str, name: str, unit: str = "layer") -> Iterator[T]:
    """Iterate ``items`` with a bar named ``name`` (count and ETA when ``items`` has a length)."""
    if not enabled:
        yield from items
        return
    total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    bar = open_bar(enabled, name, total, unit)
    try:
        for item in items:
            yield item
            bar.update()
    except BaseException:  # an error, Ctrl-C, or the consumer stopping early: the phase did not finish
        _close(bar, finished=False)
        raise
    _close(bar, finished=True)


class phase:  # noqa: N801 - used as a context manager, like open()
    """A bar for a step updated by hand: ``with phase(enabled, "refit", total=n) as bar: bar.update()``."""

    def __init__(self, enabled: bool | str, name: str, total: int | None = None, unit: str = "step"):
        self._bar = open_bar(enabled, name, total, unit)

    def __enter__(self) -> Any:
        return self._bar

    def __exit__(self, exc_type: object, *exc: object) -> None:
        _close(self._bar, finished=exc_type is None)


def say(text: str) -> None:
    """One line of progress or outcome on stderr, flushed at once (the plain-lines form of a phase)."""
    print(text, file=sys.stderr, flush=True)
