"""Grouped block-term form (convfactor/methods/grouped.py): grouping by energy, ranks, exactness, reasons."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from convfactor.errors import RankError
from convfactor.methods import get_method
from convfactor.methods.grouped import (
    GroupedConv,
    balanced_assignment,
    grouped_factors,
    valid_group_counts,
)

from .conftest import FLOAT32_TOLERANCE, FLOAT64_TOLERANCE, LayerCase, factorize, relative_error

GROUPED = get_method("grouped")
EVEN_SAME_WARNING = "ignore:Using padding='same' with even kernel lengths:UserWarning"


def _squared_error(module: nn.Module, layer: nn.Module) -> float:
    return relative_error(module.dense_weight(), layer.weight) ** 2


def _conv(c_in: int, c_out: int, weight: torch.Tensor | None = None) -> nn.Conv2d:
    layer = nn.Conv2d(c_in, c_out, 3, padding=1, dtype=torch.float64)
    if weight is not None:
        with torch.no_grad():
            layer.weight.copy_(weight)
    return layer


def _hidden_blocks(c_out: int, c_in: int, groups: int, noise: float, seed: int) -> torch.Tensor:
    """A block-diagonal 3x3 weight plus noise, its channels shuffled by random permutations."""
    generator = torch.Generator().manual_seed(seed)
    w = noise * torch.randn(c_out, c_in, 3, 3, generator=generator, dtype=torch.float64)
    p_out, p_in = c_out // groups, c_in // groups
    for q in range(groups):
        w[q * p_out:(q + 1) * p_out, q * p_in:(q + 1) * p_in] += torch.randn(
            p_out, p_in, 3, 3, generator=generator, dtype=torch.float64)
    rows = torch.randperm(c_out, generator=generator)
    cols = torch.randperm(c_in, generator=generator)
    return w[rows][:, cols]


# -- which layers ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("layer", "reason"), [
    (nn.Linear(4, 6), "not Linear"),
    (nn.Conv2d(4, 6, 3, groups=2), "does not regroup a grouped conv"),
    (nn.Conv2d(4, 8, 3, groups=4), "already depthwise"),
])
def test_unsupported_layers_have_reasons(layer: nn.Module, reason: str) -> None:
    assert reason in GROUPED.unsupported_reason(layer)
    with pytest.raises(RankError, match="grouped cannot represent this layer"):
        GroupedConv.from_conv(layer)


# -- ranks -------------------------------------------------------------------------------------------
def test_valid_group_counts_divide_both_channel_counts() -> None:
    assert valid_group_counts(12, 18) == [1, 2, 3, 6]
    assert valid_group_counts(5, 7) == [1]


@pytest.mark.parametrize(("spec", "expected"), [
    (None, 1), (1.0, 1), (0.5, 2), (0.34, 2), (1 / 3, 3), (0.3, 3), (0.2, 3), (0.1, 6), (0.01, 6),
    (3, 3), (6, 6), ((2, 12, 18), 2), ((2, 8, 12), (2, 8, 12)), ([3, 6, 9], (3, 6, 9)),
])
def test_rank_specs(spec: object, expected: object) -> None:
    assert GROUPED.resolve_rank(_conv(12, 18), rank=spec) == expected


@pytest.mark.parametrize(("spec", "message"), [
    (4, r"^grouped: g=4 must divide r_in=12 and r_out=18; valid g: 1, 2, 3, 6$"),
    ((2, 9, 18), r"^grouped: g=2 must divide r_in=9 and r_out=18; valid g: 1, 3, 9$"),
    (0, r"^grouped: g=0 is out of range"),
    ((1, 13, 18), r"^grouped: r_in=13 is out of range \[1, 12\]"),
    ((2, 12), r"^grouped: rank is g or \(g, r_in, r_out\)"),
    (1.5, r"^grouped: a fractional rank must be in \(0, 1\]"),
])
def test_rank_errors_name_valid_values(spec: object, message: str) -> None:
    with pytest.raises(RankError, match=message):
        GROUPED.resolve_rank(_conv(12, 18), rank=spec)


def test_align_lowers_g_until_groups_are_aligned() -> None:
    layer = _conv(32, 64)
    assert GROUPED.resolve_rank(layer, rank=4, align=16) == 2  # 32/4 = 8 channels per group
    assert GROUPED.resolve_rank(layer, rank=2, align=16) == 2
    assert GROUPED.resolve_rank(_conv(24, 24), rank=2, align=16) == 1  # nothing aligns: g=1
    assert GROUPED.resolve_rank(layer, rank=(2, 20, 40), align=16) == 2  # (2, 32, 64) is full
    assert GROUPED.resolve_rank(_conv(64, 64), rank=(2, 20, 40), align=16) == (2, 32, 64)
    # g=4 needs r in multiples of 64: both round up to the full 64 (g is kept, r grows).
    assert GROUPED.resolve_rank(_conv(64, 64), rank=(4, 20, 40), align=16) == 4


# -- structure ---------------------------------------------------------------------------------------
def test_stages_keep_the_original_geometry() -> None:
    layer = nn.Conv2d(6, 4, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(2, 1), padding_mode="reflect")
    module = GROUPED.decompose(layer, 2)
    assert list(dict(module.named_children())) == ["project_in", "core", "project_out"]
    assert module.project_in.weight.shape == (6, 6, 1, 1) and module.project_in.bias is None
    core = module.core
    assert (core.in_channels, core.out_channels, core.groups) == (6, 4, 2)
    assert (core.kernel_size, core.stride, core.padding, core.dilation, core.padding_mode) == (
        (3, 5), (2, 1), (1, 2), (2, 1), "reflect")
    assert module.project_out.weight.shape == (4, 4, 1, 1) and module.project_out.bias is not None
    truncated = GROUPED.decompose(layer, (2, 4, 2))
    assert truncated.rank == (2, 4, 2) and truncated.core.weight.shape == (2, 2, 3, 5)


def test_build_and_reload_reproduce_the_module() -> None:
    layer = LayerCase("Conv2d", 6, 4, (3, 3), padding=(1, 1)).build()
    for rank in (2, (2, 4, 2)):
        module = GROUPED.decompose(layer, rank)
        reloaded = GROUPED.build(layer, module.rank)
        reloaded.load_state_dict(module.state_dict())
        assert torch.equal(reloaded.dense_weight(), module.dense_weight())


# -- exactness at g = 1 ------------------------------------------------------------------------------
EXACT_CASES = [
    LayerCase("Conv2d", 4, 6, (3, 3), stride=(2, 1), padding=(1, 1)),
    LayerCase("Conv2d", 5, 3, (2, 4), padding="same", bias=False),
    LayerCase("Conv2d", 4, 6, (3, 3), padding=(1, 2), dilation=(2, 1), padding_mode="reflect"),
    LayerCase("Conv2d", 3, 4, (3, 3), stride=(2, 2), padding=(1, 1), padding_mode="circular"),
    LayerCase("Conv2d", 6, 4, (1, 1), padding_mode="replicate", padding=(1, 1)),
    LayerCase("Conv1d", 3, 2, (5,), padding=(2,)),
]


@pytest.mark.filterwarnings(EVEN_SAME_WARNING)
@pytest.mark.parametrize("case", EXACT_CASES, ids=str)
def test_one_group_is_exact(case: LayerCase) -> None:
    for dtype, tolerance in ((torch.float64, FLOAT64_TOLERANCE), (torch.float32, FLOAT32_TOLERANCE)):
        layer = case.build(dtype)
        module = factorize(GROUPED, layer, rank=1.0)
        assert module.rank == 1 and module.core.groups == 1
        x = case.input(dtype)
        with torch.no_grad():
            assert relative_error(module(x), layer(x)) <= tolerance
        assert relative_error(module.dense_weight(), layer.weight) <= tolerance
        assert module.kept_energy == pytest.approx(1.0, abs=1e-12)


def test_a_1x1_conv_with_one_channel_per_group_is_exact() -> None:
    # In its SVD bases a matrix is diagonal: g = C groups of one channel lose nothing.
    layer = LayerCase("Conv2d", 6, 6, (1, 1)).build()
    module = GROUPED.decompose(layer, 6)
    assert _squared_error(module, layer) <= 1e-20


# -- the grouping ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("c_out", "c_in", "groups", "seed"), [(16, 12, 2, 0), (32, 32, 4, 1), (24, 48, 8, 2)])
def test_hidden_block_structure_is_found(c_out: int, c_in: int, groups: int, seed: int) -> None:
    noise = 0.05
    layer = _conv(c_in, c_out, _hidden_blocks(c_out, c_in, groups, noise, seed))
    module = GROUPED.decompose(layer, groups)
    # Noise holds ~noise^2 * (g - 1) / (1 + noise^2 (g-1)) of the energy off the blocks, at most 2% here.
    assert module.kept_energy >= 0.98
    assert module.kept_energy > module.index_order_energy + 0.3
    result = grouped_factors(layer.weight, groups)
    assert result.kept_energy > result.channel_order_energy + 0.3
    # The reported energy is the dense weight's: U, V orthonormal make W_hat a projection.
    assert 1 - module.kept_energy == pytest.approx(_squared_error(module, layer), rel=1e-9, abs=1e-14)


@pytest.mark.parametrize("rank", [2, 4, (2, 6, 8), (1, 6, 8), (4, 8, 4)])
def test_reported_energy_matches_the_dense_weight_and_refinement_helps(rank: object) -> None:
    layer = LayerCase("Conv2d", 8, 16, (3, 3)).build()
    module = GROUPED.decompose(layer, rank)
    assert 1 - module.kept_energy == pytest.approx(_squared_error(module, layer), rel=1e-9, abs=1e-14)
    g, r_in, r_out = rank if isinstance(rank, tuple) else (rank, 8, 16)
    unrefined = grouped_factors(layer.weight, g, r_in, r_out, refine_sweeps=0).kept_energy
    assert module.kept_energy > unrefined  # random weights: the re-splitting always finds something
    assert unrefined >= module.index_order_energy - 1e-12


def test_kept_energy_falls_with_more_groups_on_random_weights() -> None:
    layer = LayerCase("Conv2d", 16, 16, (3, 3)).build()
    kept = [GROUPED.kept_energy(layer, g) for g in (1, 2, 4, 8, 16)]
    assert kept[0] == pytest.approx(1.0, abs=1e-12)
    assert all(b < a for a, b in zip(kept, kept[1:])), kept


def test_balanced_assignment_keeps_sizes_and_is_optimal() -> None:
    rng = np.random.default_rng(0)
    capacities = np.array([3, 2, 4])
    # Every distinct balanced labelling of 9 items (9! / (3! 2! 4!) = 1260 of them), by brute force.
    every = {tuple(p) for p in itertools.permutations(np.repeat(np.arange(3), capacities))}
    for _ in range(5):
        scores = rng.random((9, 3))
        labels = balanced_assignment(scores, capacities)
        assert np.array_equal(np.bincount(labels, minlength=3), capacities)
        best = max(scores[np.arange(9), list(p)].sum() for p in every)
        assert scores[np.arange(9), labels].sum() == pytest.approx(best, abs=1e-12)


def test_balanced_assignment_finds_a_planted_optimum() -> None:
    scores = np.full((6, 3), 0.1)
    planted = np.array([2, 0, 1, 1, 2, 0])
    scores[np.arange(6), planted] = 1.0
    assert np.array_equal(balanced_assignment(scores, np.array([2, 2, 2])), planted)


# -- energy ------------------------------------------------------------------------------------------
def test_energy_picks_the_largest_g_keeping_it() -> None:
    layer = _conv(16, 16, _hidden_blocks(16, 16, 4, 0.05, seed=3))
    assert GROUPED.resolve_rank(layer, energy=0.97) == 4
    assert GROUPED.resolve_rank(layer, energy=1.0) == 1
    random_layer = LayerCase("Conv2d", 8, 8, (3, 3)).build()
    for energy in (0.3, 0.6, 0.9):
        g = GROUPED.resolve_rank(random_layer, energy=energy)
        assert GROUPED.kept_energy(random_layer, g) >= energy
        larger = [v for v in valid_group_counts(8, 8) if v > g]
        assert all(GROUPED.kept_energy(random_layer, v) < energy for v in larger)


def test_energy_out_of_range_is_rejected() -> None:
    with pytest.raises(RankError, match=r"^grouped: energy must be in \(0, 1\]"):
        GROUPED.resolve_rank(_conv(4, 4), energy=1.5)


def test_a_zero_weight_groups_without_failing() -> None:
    layer = _conv(4, 6, torch.zeros(6, 4, 3, 3, dtype=torch.float64))
    for rank in (2, (2, 2, 4)):
        module = GROUPED.decompose(layer, rank)
        assert module.kept_energy == 1.0 and torch.count_nonzero(module.dense_weight()) == 0
    assert GROUPED.resolve_rank(layer, energy=0.9) == 2
