"""How ``grouped`` chooses its channel groups: balanced co-clustering of the core's energy matrix and the
pairwise re-splitting that refines the bases (see ``convfactor.methods.grouped`` for the math)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import SpectralCoclustering

__all__ = ["balanced_assignment", "block_energy", "index_order", "group_channels", "refine", "eigenvectors",
           "DEFAULT_REFINE_SWEEPS", "MAX_DROPPED_EXCHANGE_GROUPS", "ROUND_BUDGET"]

# Sweeps of pairwise re-splitting (each is monotone; a sweep gaining < 1e-6 of ||W||^2 ends it).
# More keep helping slowly on random weights (128x128x3x3, g=4: 0.51 / 0.54 / 0.56 kept after 2/4/8).
DEFAULT_REFINE_SWEEPS = 4
# A sweep is g-1 rounds, each rewriting the whole core, so large g get fewer sweeps (at least one):
# sweeps = min(refine_sweeps, max(1, ROUND_BUDGET // (g - 1))), i.e. 4 up to g=32, 2 at 64, 1 above.
ROUND_BUDGET = 128
# With r < C, each group is also re-split with the dropped components: one eigh of size up to C per
# group and sweep, so only for g up to this.
MAX_DROPPED_EXCHANGE_GROUPS = 64
_SEED = 0


# -- balanced assignment ---------------------------------------------------------------------------
def balanced_assignment(scores: np.ndarray, capacities: np.ndarray) -> np.ndarray:
    """Assign n items to groups with fixed sizes, maximizing sum_i scores[i, label_i] (optimal).

    SciPy's ``linear_sum_assignment`` on the capacities expanded into slots (group q repeated
    capacities[q] times): an (n, n) assignment problem whose optimum is the best balanced assignment.

    Why a library solver: the assignment is optimal for one side given the other, and the alternating
    refinement that follows decides the final kept energy, so an exact, maintained solver costs
    nothing in quality against a hand-written greedy swap search and is less code.

    Args:
        scores: (n, G) gain of putting item i in group q.
        capacities: (G,) group sizes, summing to n.
    Returns:
        labels: (n,) group of each item.
    """
    slots = np.repeat(np.arange(len(capacities)), capacities)
    items, chosen = linear_sum_assignment(scores[:, slots], maximize=True)
    labels = np.empty(len(items), dtype=np.int64)
    labels[items] = slots[chosen]
    return labels


def block_energy(energy: np.ndarray, rows: np.ndarray, cols: np.ndarray, groups: int) -> float:
    """Energy on the block diagonal: entries whose row and column share a group (< groups)."""
    same = (rows[:, None] == cols[None, :]) & (rows[:, None] < groups)
    return float(energy[same].sum())


def _scores(energy: np.ndarray, other_labels: np.ndarray, groups: int) -> np.ndarray:
    """(n, groups+1): energy item i would keep in group q given the other side's labels; the last
    column, the dropped group, keeps nothing."""
    onehot = np.zeros((len(other_labels), groups + 1))
    onehot[np.arange(len(other_labels)), other_labels] = 1.0
    out = energy @ onehot
    out[:, groups] = 0.0
    return out


def _alternate(energy: np.ndarray, rows: np.ndarray, cols: np.ndarray, groups: int,
               row_caps: np.ndarray, col_caps: np.ndarray, rounds: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Best rows given the columns, then best columns given the rows, until the block energy stops
    rising (each step is optimal for its side, so it never decreases)."""
    kept = block_energy(energy, rows, cols, groups)
    tolerance = 1e-12 * float(energy.sum())
    for _ in range(rounds):
        new_rows = balanced_assignment(_scores(energy, cols, groups), row_caps)
        new_cols = balanced_assignment(_scores(energy.T, new_rows, groups), col_caps)
        new_kept = block_energy(energy, new_rows, new_cols, groups)
        if new_kept <= kept + tolerance:
            break
        rows, cols, kept = new_rows, new_cols, new_kept
    return rows, cols


def index_order(size: int, kept: int, groups: int) -> np.ndarray:
    """The first ``kept`` components in g consecutive blocks; the rest dropped (label g)."""
    labels = np.full(size, groups)
    labels[:kept] = np.arange(kept) // (kept // groups)
    return labels


def _spectral_start(energy: np.ndarray, groups: int, row_caps: np.ndarray,
                    col_caps: np.ndarray, r_out: int, r_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Balanced spectral co-clustering (Dhillon 2001, scikit-learn's ``SpectralCoclustering``) of the
    leading (r_out, r_in) block of E.

    The co-clusters come unbalanced; rows are then assigned to g groups of the fixed sizes by the energy
    they share with each column co-cluster, and columns by the energy they share with those row groups.
    Components beyond r are dropped.
    """
    block = energy[:r_out, :r_in]
    floor = 1e-12 * max(float(block.sum()), 1e-300)  # keeps empty rows/columns finite
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fewer distinct clusters than n_clusters" on degenerate blocks
        model = SpectralCoclustering(n_clusters=groups, random_state=_SEED).fit(block + floor)
    rows = np.full(energy.shape[0], groups)
    rows[:r_out] = balanced_assignment(_scores(block, model.column_labels_, groups)[:, :groups],
                                       row_caps[:groups])
    cols = np.full(energy.shape[1], groups)
    cols[:r_in] = balanced_assignment(_scores(block.T, rows[:r_out], groups)[:, :groups], col_caps[:groups])
    return rows, cols


# -- refinement of the bases -----------------------------------------------------------------------
def _round_robin(players: int) -> list[list[tuple[int, int]]]:
    """All pairs of ``players`` in rounds of disjoint pairs (circle method)."""
    ring = list(range(players)) + ([-1] if players % 2 else [])
    rounds = []
    for _ in range(len(ring) - 1):
        half = len(ring) // 2
        rounds.append([(a, b) for a, b in zip(ring[:half], reversed(ring[half:])) if a >= 0 and b >= 0])
        ring = [ring[0], ring[-1], *ring[1:-1]]
    return rounds


def _slots(labels: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(g, size) positions of each group's components, and the dropped positions."""
    return np.stack([np.flatnonzero(labels == q) for q in range(groups)]), np.flatnonzero(labels == groups)


def _resplit(core: np.ndarray, basis: np.ndarray, slots: np.ndarray, dropped: np.ndarray,
             other: np.ndarray, exchange_dropped: bool) -> None:
    """One sweep over group pairs on the row side of ``core`` (in place).

    For groups a, b with rows R = slots[a] u slots[b], A_x = B_x B_x^T where B_x is the block
    (R, columns of group x); the best split of span(R) gives a the top-|a| eigenvectors of
    A_a - A_b (A = 0 for the dropped rows). The current split is one candidate, so the kept energy
    cannot go down. Pairs of a round are disjoint and are solved as one batch.

    Args:
        core: (n, m, K) in the current bases, rows = this side. basis: (C, n), its columns the rows'
        vectors. slots: (g, size) positions per group; dropped: positions of dropped rows.
        other: (g, size_other) positions of the column groups.
        exchange_dropped: also re-split each group with the dropped rows (one eigh of size
        |group| + |dropped| per group).
    """
    def grams(sub: np.ndarray, columns: np.ndarray) -> np.ndarray:
        # sub (P, R, m, K), columns (P, c): the (P, R, R) Gram matrices of the blocks.
        block = np.take_along_axis(sub, columns[:, None, :, None], axis=2).reshape(len(sub), sub.shape[1], -1)
        return block @ block.transpose(0, 2, 1)

    def rotate(rows: np.ndarray, sub: np.ndarray, target: np.ndarray) -> None:
        # eigh sorts ascending; reversed columns put the |a| best directions in a's slots.
        rotation = eigenvectors(target)  # (P, R, R)
        core[rows] = (rotation.transpose(0, 2, 1) @ sub.reshape(*rows.shape, -1)).reshape(sub.shape)
        basis[:, rows] = np.einsum("cps,psr->cpr", basis[:, rows], rotation)

    for pairs in _round_robin(len(slots)):
        if not pairs:
            continue
        a = np.array([p for p, _ in pairs])
        b = np.array([q for _, q in pairs])
        rows = np.concatenate([slots[a], slots[b]], axis=1)  # (P, 2 size)
        sub = core[rows]
        rotate(rows, sub, grams(sub, other[a]) - grams(sub, other[b]))
    if exchange_dropped and len(dropped):
        for q in range(len(slots)):
            rows = np.concatenate([slots[q], dropped])[None]  # (1, size + |dropped|)
            sub = core[rows]
            rotate(rows, sub, grams(sub, other[q:q + 1]))


def refine(core: np.ndarray, u: np.ndarray, v: np.ndarray, rows: np.ndarray, cols: np.ndarray,
            groups: int, sweeps: int, total: float) -> np.ndarray:
    """Alternate pairwise re-splitting of the output and input bases (``u``, ``v`` in place).

    Stops after ``sweeps`` (fewer for large g, see ROUND_BUDGET) or when a sweep gains less than
    1e-6 of ||W||^2. Returns the new core.
    """
    row_slots, row_dropped = _slots(rows, groups)
    col_slots, col_dropped = _slots(cols, groups)
    exchange_dropped = groups <= MAX_DROPPED_EXCHANGE_GROUPS
    sweeps = min(sweeps, max(1, ROUND_BUDGET // max(1, groups - 1)))
    before = block_energy((core**2).sum(-1), rows, cols, groups)
    for _ in range(sweeps):
        _resplit(core, u, row_slots, row_dropped, col_slots, exchange_dropped)
        transposed = np.ascontiguousarray(core.transpose(1, 0, 2))
        _resplit(transposed, v, col_slots, col_dropped, row_slots, exchange_dropped)
        core = np.ascontiguousarray(transposed.transpose(1, 0, 2))
        after = block_energy((core**2).sum(-1), rows, cols, groups)
        if after - before <= 1e-6 * total:
            break
        before = after
    return core


def group_channels(energy: np.ndarray, groups: int, row_caps: np.ndarray, col_caps: np.ndarray,
           r_out: int, r_in: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Best balanced co-clustering of ``energy`` from the index-order and the spectral starts."""
    c_out, c_in = energy.shape
    index = (index_order(c_out, r_out, groups), index_order(c_in, r_in, groups))
    if groups == 1 or not energy.any():  # a zero weight: every grouping keeps all of nothing
        return index[0], index[1], block_energy(energy, *index, groups)
    best = (index[0], index[1], -1.0)
    for start_rows, start_cols in (index, _spectral_start(energy, groups, row_caps, col_caps, r_out, r_in)):
        rows, cols = _alternate(energy, start_rows, start_cols, groups, row_caps, col_caps)
        kept = block_energy(energy, rows, cols, groups)
        if kept > best[2]:
            best = (rows, cols, kept)
    return best


def eigenvectors(matrix: np.ndarray) -> np.ndarray:
    """Eigenvectors of symmetric (..., n, n) matrices, largest eigenvalue first. torch's eigh: NumPy's
    took 7x longer on a 1,024 x 1,024 matrix here (14.0 s against 2.0 s, one thread)."""
    return torch.linalg.eigh(torch.from_numpy(np.ascontiguousarray(matrix)))[1].numpy()[..., ::-1]


