"""Ranks: the arithmetic every method shares (fractions, energies, bounds, alignment) and their one
text and JSON form.

A rank spec from a policy is one of
  * an int (absolute; its meaning is per method: r, R, m or g),
  * a list of ints (methods with several ranks, e.g. Tucker-2's (r_in, r_out)),
  * a float in (0, 1]: the fraction of the full rank, so ``1.0`` is always exact,
and, instead of a rank, ``energy`` in (0, 1]: the smallest rank keeping that fraction of the squared
singular values.

A resolved rank (``Rank``: an int, or a tuple of ints) is written as JSON with a list for a tuple
(``rank_to_json``/``rank_from_json``) and shown to a reader as ``8`` or ``8x16`` (``rank_text``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import RankError

__all__ = [
    "fraction_to_rank",
    "check_rank",
    "smallest_rank_for_energy",
    "kept_energy",
    "align_rank",
    "is_fraction",
    "shared_rank_spectrum",
    "rank_text",
    "rank_to_json",
    "rank_from_json",
]


def is_fraction(spec: object) -> bool:
    """True for a float rank spec (a fraction of the full rank); bools and ints are not fractions."""
    return isinstance(spec, float)


def fraction_to_rank(fraction: float, full: int) -> int:
    """ceil(fraction * full), at least 1. The epsilon keeps 0.5 * 64 at 32, not 33 from rounding."""
    if not 0.0 < fraction <= 1.0:
        raise RankError(f"a fractional rank must be in (0, 1], got {fraction}")
    return max(1, min(full, math.ceil(fraction * full - 1e-9)))


def check_rank(value: int, full: int, what: str, method: str) -> int:
    """Validate an absolute rank against its range [1, full] and return it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise RankError(f"{method}: {what} must be an int, got {value!r}")
    if not 1 <= value <= full:
        raise RankError(f"{method}: {what}={value} is out of range [1, {full}] for this layer")
    return int(value)


def kept_energy(singular_values: Sequence[float] | np.ndarray, rank: int) -> float:
    """Fraction of the squared singular values kept by the first ``rank`` of them."""
    s2 = np.asarray(singular_values, dtype=np.float64) ** 2
    total = s2.sum()
    return 1.0 if total == 0 else float(s2[:rank].sum() / total)


def shared_rank_spectrum(per_group: np.ndarray) -> np.ndarray:
    """One spectrum for a rank shared by several groups (or channels): (n, k) singular values -> (k,).

    Keeping rank r keeps the first r triplets of every row, so the j-th entry carries the energy of the
    j-th triplets summed over rows; energy arithmetic on it is then exact for the shared rank.
    """
    return np.sqrt((np.asarray(per_group, dtype=np.float64) ** 2).sum(axis=0))


def smallest_rank_for_energy(singular_values: Sequence[float] | np.ndarray, energy: float) -> int:
    """Smallest r with kept_energy(s, r) >= energy (s sorted in decreasing order)."""
    if not 0.0 < energy <= 1.0:
        raise RankError(f"energy must be in (0, 1], got {energy}")
    s2 = np.sort(np.asarray(singular_values, dtype=np.float64) ** 2)[::-1]
    total = s2.sum()
    if total == 0:
        return 1
    cumulative = np.cumsum(s2) / total
    # A relative slack of 1e-12 so that energy=1.0 stops at the numerical rank, not at noise.
    return int(min(len(s2), np.searchsorted(cumulative, energy - 1e-12) + 1))


def align_rank(rank: int, multiple: int | None, full: int) -> int:
    """Round ``rank`` up to a multiple of ``multiple`` (hardware-friendly channel counts), capped at full."""
    if not multiple or multiple <= 1:
        return rank
    return min(full, int(math.ceil(rank / multiple) * multiple))


def rank_text(rank: Any) -> str:
    """A rank for a table or message: ``8``, ``8x16`` for several components, ``-`` for none."""
    if rank is None:
        return "-"
    return "x".join(str(r) for r in rank) if isinstance(rank, (list, tuple)) else str(rank)


def rank_to_json(rank: Any) -> Any:
    """A rank (or rank spec) as JSON holds it: a tuple becomes a list, anything else is kept."""
    return list(rank) if isinstance(rank, tuple) else rank


def rank_from_json(value: Any) -> int | tuple[int, ...]:
    """A resolved rank read back from JSON: an int, or a tuple of ints from a list."""
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else int(value)
