"""Candidates' predicted errors kept across target kinds: each (layer, method, rank) is fitted once.

A candidate's error2 is a function of the layer, its calibration statistics, the method and the rank, not
of the target's kind: the kind decides the candidates' costs, which of them a layer keeps and which one
probes its sensitivity. A sweep's MACs points share one scoring (``SharedWork.scored``), but its latency
point scores again: a subset of the same rank grid (spread, then timed), each method's data-aware factorizer
built anew (an eigendecomposition of the layer's whitened weight) and every rank refitted. ``SharedWork``
keeps every error2 computed for one network, data set and options (a ``LayerErrors`` per layer) and a later
scoring reads the kept values, building a method's factorizer only for a rank not seen before or for the
layer's sensitivity probe.

A kept error equals the one a lone run computes to rounding, not always to the bit: a factorizer's products
grow with the ranks asked of it (``NestedProducts.extend``), and a product computed in other column blocks
can round differently (1e-15 relative measured on the tests' network). The allocator counts losses within
``LOSS_RTOL`` (1e-4) of each other as equal, so the allocation does not follow such differences.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MethodErrors", "LayerErrors", "MemoErrors", "rank_key"]


@dataclass
class MethodErrors:
    """The error2 of one (layer, method) at every rank computed so far, and the notes its scoring made."""

    errors: dict[Hashable, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# One layer's kept errors, by method name (the layer's whole entry travels with its scoring task).
LayerErrors = dict[str, MethodErrors]


def rank_key(rank: Any) -> Hashable:
    """A rank as a dict key (Tucker-2's pair may come as a list)."""
    return tuple(rank) if isinstance(rank, (list, tuple)) else rank


class MemoErrors:
    """rank -> error2 of one (layer, method): the kept value, else the function ``build()`` returns (built on
    the first rank not kept, once), whose value is then kept."""

    def __init__(self, kept: MethodErrors, build: Callable[[], Callable[[Any], float]]):
        self.kept = kept
        self._build = build
        self.function: Callable[[Any], float] | None = None

    def __call__(self, rank: Any) -> float:
        key = rank_key(rank)
        if key not in self.kept.errors:
            if self.function is None:
                self.function = self._build()
            self.kept.errors[key] = float(self.function(rank))
        return self.kept.errors[key]
