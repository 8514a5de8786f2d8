"""Progress bars for long steps: the phase name, a count and an ETA on stderr (tqdm), or nothing.

    for layer in track(layers, enabled, "candidates"):
        ...
    with phase(enabled, "allocation", total=1) as bar:
        ...; bar.update()

Phases of ``factorize`` with a target or ``method: auto``: statistics (calibration batches),
candidates (layers), sensitivities (layers), allocation, refit (layers), latency check.
Disabled bars cost nothing and print nothing, so callers pass their ``progress`` flag straight in.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["track", "phase"]

T = TypeVar("T")
_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}]"


def _bar(enabled: bool, name: str, total: int | None, unit: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=name, unit=unit, leave=False, disable=not enabled, bar_format=None
                if total is None else "{desc}: {percentage:3.0f}%|{bar:20}| " + _FORMAT.split(": ", 1)[1])


def track(items: Iterable[T], enabled: bool, name: str, unit: str = "layer") -> Iterator[T]:
    """Iterate ``items`` with a bar named ``name`` (count and ETA when ``items`` has a length)."""
    if not enabled:
        yield from items
        return
    total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    bar = _bar(True, name, total, unit)
    try:
        for item in items:
            yield item
            bar.update()
    finally:
        bar.close()


class phase:  # noqa: N801 - used as a context manager, like open()
    """A bar for a step updated by hand: ``with phase(enabled, "refit", total=n) as bar: bar.update()``."""

    def __init__(self, enabled: bool, name: str, total: int | None = None, unit: str = "step"):
        self._bar = _bar(enabled, name, total, unit)

    def __enter__(self) -> Any:
        return self._bar

    def __exit__(self, *exc: object) -> None:
        self._bar.close()
