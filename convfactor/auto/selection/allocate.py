"""Budget allocation: pick one option per layer minimizing total predicted loss under a total cost budget.

This is a multiple-choice knapsack: groups g = 1..n, options (cost_gi, loss_gi), choose one i per group,
minimize sum loss subject to sum cost <= budget. Two solvers run and the better feasible answer wins:

  * Lagrangian greedy: walk each group's lower convex hull of (cost, loss) from its cheapest point,
    always taking the upgrade with the largest loss decrease per unit of cost that still fits, then
    fill the remaining budget with the best single-group swaps (hull or not).
  * dynamic programming over the budget cut into ``bins`` steps, every cost rounded *up* to a whole
    step, so any DP answer is feasible with the exact costs; it is optimal among all choices whose
    exact total is <= budget - n * budget / bins.

Feasibility is always checked with the exact costs; nothing is ever rounded in the caller's favour.

Losses that differ by less than ``LOSS_RTOL`` (relative) are one loss: the solvers see, per group, only the
options that lose less than every cheaper one by more than that (``distinct_options``), and the dynamic
program's answer replaces the greedy's only when it is lower by more than that. Two candidates can be the same
approximation (of a 1x1 conv: an SVD of rank r, a spatial SVD of rank r at the same cost, a Tucker-2 of
ranks (r, r) at a little more), their predicted errors equal but for float rounding, which changes with the
memory layout and thread count of the passes that measured them: without the tolerance that rounding chose
between them (CRAFT's 1024 -> 1024 1x1 conv: Tucker-2 (64, 64) in channels-last passes, spatial SVD 64 in
contiguous ones, SVD 64 in another run; a Dask run's allocation differed from the serial one).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Allocation", "InfeasibleBudget", "allocate", "lower_convex_hull", "distinct_options", "LOSS_RTOL"]

DEFAULT_BINS = 4000
# Relative loss differences below this are float rounding of the measured statistics (float32 passes: a few
# 1e-7, more where an error is a small difference of large energies), not a difference in fidelity.
LOSS_RTOL = 1e-4


class InfeasibleBudget(ValueError):
    """Even the cheapest option of every group costs more than the budget."""

    def __init__(self, minimum: float, budget: float):
        super().__init__(f"the cheapest choice costs {minimum:g}, more than the budget {budget:g}")
        self.minimum = minimum
        self.budget = budget


@dataclass(frozen=True)
class Allocation:
    """The chosen option index per group, its total cost and loss, and which solver found it."""

    choice: tuple[int, ...]
    cost: float
    loss: float
    solver: str


Options = Sequence[Sequence[tuple[float, float]]]


def lower_convex_hull(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the lower-left convex hull of (cost, loss) points, by increasing cost.

    Only points that are not dominated (no other point is at most as costly and strictly better) and
    lie on the convex hull are kept: those are the options a Lagrangian trade-off can select.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    frontier: list[int] = []
    for i in order:
        if frontier and points[i][1] >= points[frontier[-1]][1]:
            continue  # dominated: costs at least as much as the last frontier point, no lower loss
        frontier.append(i)
    hull: list[int] = []
    for i in frontier:
        while len(hull) >= 2:
            (c0, l0), (c1, l1), (c2, l2) = points[hull[-2]], points[hull[-1]], points[i]
            # Drop the middle point when it lies on or above the segment from the first to the last.
            if (l1 - l0) * (c2 - c0) >= (l2 - l0) * (c1 - c0):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def distinct_options(group: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the options of one group worth choosing, by increasing cost: each loses less than every
    cheaper (or equally costly, earlier) one by more than ``LOSS_RTOL`` of that loss. Of twins (equal cost,
    equal loss but for rounding: an SVD and a spatial SVD of a 1x1 conv) the first is kept, whichever
    rounded lower."""
    order = sorted(range(len(group)), key=lambda i: (group[i][0], i))
    kept = [order[0]]
    for i in order[1:]:
        if _better(group[i][1], group[kept[-1]][1]):
            kept.append(i)
    return kept


def _better(loss: float, than: float) -> bool:
    """Whether ``loss`` is lower than ``than`` by more than rounding (``LOSS_RTOL``)."""
    return loss < than - LOSS_RTOL * abs(than)


def _totals(options: Options, choice: Sequence[int]) -> tuple[float, float]:
    cost = math.fsum(options[g][i][0] for g, i in enumerate(choice))
    loss = math.fsum(options[g][i][1] for g, i in enumerate(choice))
    return cost, loss


def _greedy(options: Options, budget: float) -> list[int]:
    hulls = [lower_convex_hull(group) for group in options]
    position = [0] * len(options)
    choice = [hull[0] for hull in hulls]
    spent = math.fsum(options[g][choice[g]][0] for g in range(len(options)))

    def push(heap: list, g: int) -> None:
        if position[g] + 1 < len(hulls[g]):
            (c0, l0), (c1, l1) = options[g][hulls[g][position[g]]], options[g][hulls[g][position[g] + 1]]
            heapq.heappush(heap, (-(l0 - l1) / max(c1 - c0, 1e-300), g))

    heap: list = []
    for g in range(len(options)):
        push(heap, g)
    while heap:
        _, g = heapq.heappop(heap)
        nxt = hulls[g][position[g] + 1]
        delta = options[g][nxt][0] - options[g][choice[g]][0]
        if spent + delta > budget:
            continue  # this group's next hull step does not fit; the swap pass below may still help it
        spent += delta
        position[g] += 1
        choice[g] = nxt
        push(heap, g)
    return _fill(options, choice, budget)


def _fill(options: Options, choice: list[int], budget: float) -> list[int]:
    """Repeatedly apply the single-group swap that lowers the loss most and still fits the budget."""
    spent = math.fsum(options[g][i][0] for g, i in enumerate(choice))
    while True:
        best, best_gain = None, 0.0
        for g, group in enumerate(options):
            c_now, l_now = group[choice[g]]
            for i, (c, l) in enumerate(group):
                gain = l_now - l
                if gain > best_gain and spent - c_now + c <= budget:
                    best, best_gain = (g, i), gain
        if best is None:
            return choice
        g, i = best
        spent += options[g][i][0] - options[g][choice[g]][0]
        choice[g] = i


def _dynamic_programming(options: Options, budget: float, bins: int) -> list[int] | None:
    if budget <= 0:
        return None
    step = budget / bins
    dp = np.zeros(bins + 1)  # dp[b]: least loss of the groups so far within b steps
    picks = []
    for group in options:
        new = np.full(bins + 1, np.inf)
        pick = np.full(bins + 1, -1, dtype=np.int64)
        for i, (cost, loss) in enumerate(group):
            steps = math.ceil(cost / step - 1e-12) if cost > 0 else 0
            if steps > bins:
                continue
            candidate = np.full(bins + 1, np.inf)
            candidate[steps:] = dp[: bins + 1 - steps] + loss
            better = candidate < new
            new[better] = candidate[better]
            pick[better] = i
        picks.append(pick)
        dp = new
    if not np.isfinite(dp[bins]):
        return None
    choice = []
    b = bins
    for g in range(len(options) - 1, -1, -1):
        i = int(picks[g][b])
        choice.append(i)
        cost = options[g][i][0]
        b -= math.ceil(cost / step - 1e-12) if cost > 0 else 0
    return choice[::-1]


def allocate(options: Options, budget: float, bins: int = DEFAULT_BINS) -> Allocation:
    """Choose one option per group minimizing the total loss with total cost <= ``budget``.

    Args:
        options: per group, a non-empty list of (cost, loss); costs >= 0.
        budget: the largest allowed sum of the chosen costs.
        bins: budget resolution of the dynamic program.
    Returns:
        The best feasible ``Allocation`` found by the greedy and the dynamic program (indices into ``options``).
    Raises:
        InfeasibleBudget: the cheapest option of every group together exceed the budget.

    Example:
        >>> allocate([[(10, 0.0), (4, 1.0)], [(10, 0.0), (4, 0.1)]], budget=14).choice
        (0, 1)
    """
    if any(len(group) == 0 for group in options):
        raise ValueError("every group needs at least one option")
    minimum = math.fsum(min(c for c, _ in group) for group in options)
    if minimum > budget:
        raise InfeasibleBudget(minimum, budget)
    kept = [distinct_options(group) for group in options]
    reduced = [[group[i] for i in indices] for group, indices in zip(options, kept)]
    found = [(_greedy(reduced, budget), "greedy")]
    dp = _dynamic_programming(reduced, budget, bins)
    if dp is not None:
        found.append((_fill(reduced, dp, budget), "dynamic programming"))
    best = None
    for choice, solver in found:
        choice = [indices[i] for indices, i in zip(kept, choice)]
        cost, loss = _totals(options, choice)
        if cost <= budget and (best is None or _better(loss, best.loss)):
            best = Allocation(tuple(choice), cost, loss, solver)
    assert best is not None, "the greedy start is the cheapest choice, which fits"
    return best
