"""The points of a sweep: targets as the user writes them, and the uniform baseline beside them.

    --targets macs=0.7,0.5,0.35,0.25 latency=0.8,0.6   ->   (macs, 0.7), (macs, 0.5), ..., (latency, 0.6)

A kind is one of the policy's target kinds (``macs``, ``params``, ``latency``); a fraction is in (0, 1), as
a policy's ``target`` takes it. The uniform baseline is what a user without convfactor's allocation would
do: one method at one rank fraction for every layer, from the weights alone; ``uniform_rank`` finds, per
MACs point, the rank fraction whose model costs that fraction of the original's MACs (bisection on the
MACs ``factorize`` reports; MACs fall as the rank does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ..errors import ConvfactorError
from ..policy import TARGET_KINDS

__all__ = ["Target", "parse_targets", "uniform_rank", "first_of_each_kind", "BISECTION_STEPS"]

BISECTION_STEPS = 7  # rank fraction to within 1/128 of the range


@dataclass(frozen=True)
class Target:
    """One point asked for: ``kind`` of ``TARGET_KINDS`` and ``fraction`` of the original's cost."""

    kind: str
    fraction: float

    @property
    def label(self) -> str:
        return f"{self.kind}={self.fraction:g}"


def parse_targets(texts: Iterable[str] | str, flag: str = "targets") -> list[Target]:
    """``["macs=0.7,0.5", "latency=0.8"]`` (or one string of them, space-separated) -> ``Target``s in order.

    Raises:
        ConvfactorError: an unknown kind, a fraction outside (0, 1), a repeated point or none at all; one line
            naming ``flag``.
    """
    if isinstance(texts, str):
        texts = texts.split()
    targets: list[Target] = []
    for text in texts:
        kind, sep, values = str(text).partition("=")
        kind = kind.strip().lower()
        if not sep or kind not in TARGET_KINDS:
            raise ConvfactorError(f"{flag}: expected KIND=F1,F2,... with KIND one of {', '.join(TARGET_KINDS)}, "
                                  f"e.g. macs=0.7,0.5; got {text!r}")
        for raw in values.split(","):
            try:
                fraction = float(raw)
            except ValueError:
                fraction = float("nan")
            if not 0 < fraction < 1:
                raise ConvfactorError(f"{flag}: {kind} fraction {raw.strip()!r} is not a number in (0, 1)")
            target = Target(kind, fraction)
            if target in targets:
                raise ConvfactorError(f"{flag}: {target.label} is given twice")
            targets.append(target)
    if not targets:
        raise ConvfactorError(f"{flag}: no target given (e.g. macs=0.7,0.5 latency=0.8)")
    return targets


def uniform_rank(macs_fraction: Callable[[float], float], wanted: float,
                 steps: int = BISECTION_STEPS) -> tuple[float, float]:
    """The rank fraction r in (0, 1] whose uniform model costs closest to ``wanted`` of the original MACs,
    not above it where one reaches it, and that model's MACs fraction.

    Args:
        macs_fraction: r -> the MACs fraction of the uniform model at rank fraction r (non-decreasing in r).
    """
    low, high = 0.0, 1.0
    best: tuple[float, float] | None = None
    for _ in range(steps):
        middle = (low + high) / 2
        got = macs_fraction(middle)
        if got <= wanted:
            best = (middle, got) if best is None or got > best[1] else best
            low = middle
        else:
            high = middle
    if best is None:  # even the smallest rank tried costs more: the cheapest there is
        best = (high, macs_fraction(high))
    return best


def first_of_each_kind(targets: Sequence[Target]) -> list[int]:
    """Indices of the first target of each kind (they compute what the others of their kind reuse)."""
    seen: set[str] = set()
    out = []
    for index, target in enumerate(targets):
        if target.kind not in seen:
            seen.add(target.kind)
            out.append(index)
    return out

