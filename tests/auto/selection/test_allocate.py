"""The budget allocator: always feasible, near-optimal against brute force, never a uniform compromise."""

import itertools
import math
import random

import pytest

from convfactor.auto.selection.allocate import (
    DEFAULT_BINS,
    InfeasibleBudget,
    allocate,
    distinct_options,
    lower_convex_hull,
)


def brute_force(options, budget):
    best = math.inf
    for choice in itertools.product(*[range(len(g)) for g in options]):
        cost = sum(options[g][i][0] for g, i in enumerate(choice))
        if cost <= budget:
            best = min(best, sum(options[g][i][1] for g, i in enumerate(choice)))
    return best


def random_instance(rng, groups, per_group):
    options = []
    for _ in range(groups):
        full = rng.uniform(50, 200)
        group = [(full, 0.0)]  # "leave as is": full cost, no loss
        for _ in range(per_group - 1):
            fraction = rng.uniform(0.05, 0.95)
            group.append((full * fraction, rng.uniform(0, 1) * (1 - fraction) ** rng.uniform(0.5, 3)))
        options.append(group)
    return options


@pytest.mark.parametrize("seed", range(40))
def test_feasible_and_within_the_dp_guarantee_of_brute_force(seed):
    rng = random.Random(seed)
    options = random_instance(rng, groups=rng.randint(2, 4), per_group=rng.randint(2, 5))
    full = sum(g[0][0] for g in options)
    budget = rng.uniform(0.3, 0.9) * full
    minimum = sum(min(c for c, _ in g) for g in options)
    if minimum > budget:
        with pytest.raises(InfeasibleBudget):
            allocate(options, budget)
        return
    result = allocate(options, budget)
    cost = sum(options[g][i][0] for g, i in enumerate(result.choice))
    loss = sum(options[g][i][1] for g, i in enumerate(result.choice))
    assert cost <= budget and abs(cost - result.cost) <= 1e-9 * budget and abs(loss - result.loss) <= 1e-12
    # Every DP cost is rounded up by < budget/bins, so the answer is at least as good as the optimum of
    # the budget shrunk by groups * budget / bins; and never better than the true optimum.
    shrunk = budget * (1 - len(options) / DEFAULT_BINS)
    assert brute_force(options, budget) - 1e-12 <= loss <= brute_force(options, shrunk) + 1e-12


def test_budget_goes_where_it_buys_the_most_fidelity():
    # Layer a loses little when compressed, layer b a lot: a uniform 50% cut would pay 0.1 + 1.0.
    options = [[(100, 0.0), (50, 0.1), (25, 0.2)], [(100, 0.0), (50, 1.0), (25, 2.0)]]
    result = allocate(options, budget=125)
    assert result.choice == (2, 0) and result.loss == pytest.approx(0.2, abs=1e-12)


def test_infeasible_budget_reports_the_minimum():
    with pytest.raises(InfeasibleBudget) as info:
        allocate([[(10, 0.0), (6, 1.0)], [(10, 0.0), (5, 1.0)]], budget=10)
    assert info.value.minimum == 11


def test_lower_convex_hull_drops_dominated_and_concave_points():
    points = [(10, 0.0), (8, 0.5), (6, 0.6), (4, 2.0), (5, 3.0), (2, 4.0)]
    # (5, 3.0) is dominated by (4, 2.0); (8, 0.5) lies above the segment from (6, 0.6) to (10, 0.0).
    assert lower_convex_hull(points) == [5, 3, 2, 0]


@pytest.mark.parametrize("edge", [-1e-9, 0.0, 1e-9])
def test_a_costlier_option_equal_but_for_rounding_is_never_chosen(edge):
    # Group 0's options 1 and 2 are the same approximation (an SVD of rank r and a Tucker-2 of ranks (r, r)
    # of a 1x1 conv): their losses agree but for rounding, which must not decide between them.
    options = [[(100, 0.0), (12.5, 0.3), (12.6, 0.3 * (1 + edge)), (50, 0.1)], [(100, 0.0), (40, 0.2)]]
    result = allocate(options, budget=60)
    assert result.choice == (1, 1) and result.cost == pytest.approx(52.5)


def test_distinct_options_keep_only_what_loses_measurably_less():
    group = [(100, 0.0), (12.6, 0.3 * (1 - 1e-9)), (12.5, 0.3), (30, 0.3 * (1 - 2e-4)), (30, 0.2), (50, 0.1)]
    # (12.6) equals (12.5) but for rounding; (30, 0.29994) loses measurably less than 0.3 (kept: the solvers
    # drop what (30, 0.2) dominates exactly).
    assert distinct_options(group) == [2, 3, 4, 5, 0]


@pytest.mark.parametrize("edge", [-1e-9, 0.0, 1e-9])
def test_of_equally_costly_twins_the_first_is_kept_whichever_rounded_lower(edge):
    # An SVD and a spatial SVD of a 1x1 conv: the same cost, the same loss but for rounding.
    group = [(100, 0.0), (25, 0.3), (25, 0.3 * (1 + edge)), (50, 0.1)]
    assert distinct_options(group) == [1, 3, 0]
    assert allocate([group, [(100, 0.0), (40, 0.2)]], budget=70).choice == (1, 1)
