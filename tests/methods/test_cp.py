"""CP (convfactor/methods/cp.py): structure, exact construction, CP-ALS, energy, reasons, memory."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
from torch import nn

from convfactor.errors import RankError
from convfactor.methods import get_method
from convfactor.methods.cp import (
    CPConv,
    cp_als,
    cp_exact_factors,
    cp_full_rank,
    cp_truncated_exact_factors,
)

from .conftest import FLOAT32_TOLERANCE, FLOAT64_TOLERANCE, LayerCase, factorize, measure_in_subprocess, relative_error

CP = get_method("cp")
EVEN_SAME_WARNING = "ignore:Using padding='same' with even kernel lengths:UserWarning"


def _squared_error(module: nn.Module, layer: nn.Module) -> float:
    return relative_error(module.dense_weight(), layer.weight) ** 2


# -- which layers ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("layer", "reason"), [
    (nn.Linear(4, 6), "not Linear"),
    (nn.Conv2d(4, 6, 3, groups=2), "cp does not factorize grouped convs"),
    (nn.Conv2d(4, 8, 3, groups=4), "already depthwise"),
    (nn.Conv2d(4, 6, 1), "use svd"),
    (nn.Conv1d(4, 6, 1), "use svd"),
])
def test_unsupported_layers_have_reasons(layer: nn.Module, reason: str) -> None:
    assert reason in CP.unsupported_reason(layer)
    with pytest.raises(RankError, match="cp cannot represent this layer"):
        CPConv.from_conv(layer)


def test_supported_layers() -> None:
    assert CP.unsupported_reason(nn.Conv2d(4, 6, 3)) is None
    assert CP.unsupported_reason(nn.Conv2d(4, 6, (1, 3))) is None
    assert CP.unsupported_reason(nn.Conv1d(4, 6, 5)) is None


# -- ranks -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("shape", "full"), [
    ((6, 4, 3, 3), 36),  # largest mode C_out absorbs the weight: 4*3*3 terms
    ((4, 6, 3, 3), 36),
    ((2, 3, 9), 6),  # Conv1d whose kernel is the largest mode
    ((8, 8, 1, 3), 24),
])
def test_full_rank_is_prod_over_max(shape: tuple[int, ...], full: int) -> None:
    assert cp_full_rank(shape) == full


def test_rank_specs_resolve_against_the_full_rank() -> None:
    layer = nn.Conv2d(4, 6, 3)  # R_full = 36
    assert CP.full_rank(layer) == 36
    assert CP.resolve_rank(layer, rank=1.0) == 36
    assert CP.resolve_rank(layer, rank=0.5) == 18
    assert CP.resolve_rank(layer, rank=5, align=4) == 8
    with pytest.raises(RankError, match=r"^cp: R=37 is out of range \[1, 36\]"):
        CP.resolve_rank(layer, rank=37)


# -- structure ---------------------------------------------------------------------------------------
def test_stages_of_a_conv2d() -> None:
    layer = nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), padding_mode="reflect")
    module = CP.decompose(layer, 7)
    assert list(dict(module.named_children())) == ["project_in", "depthwise_h", "depthwise_w", "project_out"]
    assert module.project_in.weight.shape == (7, 4, 1, 1)
    h, w = module.depthwise_h, module.depthwise_w
    assert (h.groups, h.kernel_size, h.stride, h.padding, h.dilation) == (7, (3, 1), (2, 1), (1, 0), (1, 1))
    assert (w.groups, w.kernel_size, w.stride, w.padding, w.dilation) == (7, (1, 5), (1, 1), (0, 2), (1, 2))
    assert h.padding_mode == w.padding_mode == "reflect"
    assert module.project_out.weight.shape == (6, 7, 1, 1) and module.project_out.bias is not None
    assert module.project_in.bias is None and h.bias is None and w.bias is None


def test_stages_of_a_conv1d() -> None:
    module = CP.decompose(nn.Conv1d(4, 6, 3, stride=2, bias=False), 5)
    assert list(dict(module.named_children())) == ["project_in", "depthwise_h", "project_out"]
    assert module.depthwise_h.weight.shape == (5, 1, 3) and module.depthwise_h.stride == (2,)
    assert module.project_out.bias is None


# -- exactness at full rank --------------------------------------------------------------------------
EXACT_CASES = [
    LayerCase("Conv2d", 4, 6, (3, 3), stride=(2, 1), padding=(1, 1)),
    LayerCase("Conv2d", 5, 3, (2, 4), padding="same", bias=False),  # even kernel: asymmetric padding
    LayerCase("Conv2d", 4, 6, (3, 3), padding=(1, 2), dilation=(2, 1), padding_mode="reflect"),
    LayerCase("Conv2d", 3, 4, (3, 3), stride=(2, 2), padding=(1, 1), padding_mode="circular"),
    LayerCase("Conv2d", 3, 4, (3, 1), padding=(1, 0), padding_mode="replicate"),
    LayerCase("Conv1d", 3, 2, (9,), padding=(4,)),  # the kernel is the largest mode
    LayerCase("Conv1d", 4, 6, (3,), stride=(2,), padding="valid"),
]


@pytest.mark.filterwarnings(EVEN_SAME_WARNING)
@pytest.mark.parametrize("case", EXACT_CASES, ids=str)
def test_full_rank_is_exact(case: LayerCase) -> None:
    for dtype, tolerance in ((torch.float64, FLOAT64_TOLERANCE), (torch.float32, FLOAT32_TOLERANCE)):
        layer = case.build(dtype)
        module = factorize(CP, layer, rank=1.0)
        x = case.input(dtype)
        with torch.no_grad():
            assert relative_error(module(x), layer(x)) <= tolerance
        assert relative_error(module.dense_weight(), layer.weight) <= tolerance
        assert module.relative_squared_error == 0.0


def test_exact_construction_is_one_term_per_fiber_of_the_largest_mode() -> None:
    w = torch.randn(5, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    factors = cp_exact_factors(w)
    assert [f.shape for f in factors] == [(5, 12), (3, 12), (2, 12), (2, 12)]
    # The three smaller modes are scaled one-hot columns: one non-zero per column.
    for f in factors[1:]:
        assert ((f != 0).sum(dim=0) == 1).all()
    assert relative_error(torch.einsum("or,ir,hr,wr->oihw", *factors), w) <= FLOAT64_TOLERANCE


# -- below full rank ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("shape", "rank", "seed"), [((8, 7, 5), 3, 0), ((8, 7, 5), 3, 1), ((8, 6, 3, 3), 4, 2)])
def test_als_recovers_an_exactly_low_rank_tensor(shape: tuple[int, ...], rank: int, seed: int) -> None:
    # ALS can swamp on some draws (e.g. 6x5x4 at R=4); these converge in 22-77 sweeps.
    generator = torch.Generator().manual_seed(seed)
    factors = [torch.randn(size, rank, generator=generator, dtype=torch.float64) for size in shape]
    letters = "abcd"[: len(shape)]
    equation = ",".join(f"{c}r" for c in letters) + "->" + letters
    tensor = torch.einsum(equation, *factors)
    result = cp_als(tensor, rank, max_sweeps=200)
    assert result.relative_squared_error <= 1e-12
    assert relative_error(torch.einsum(equation, *result.factors), tensor) <= 1e-6


def test_reported_error_is_the_dense_weights_error_and_beats_the_truncated_construction() -> None:
    layer = LayerCase("Conv2d", 6, 8, (3, 3)).build()
    for rank in (2, 10, 30):
        module = CP.decompose(layer, rank)
        assert module.relative_squared_error == pytest.approx(_squared_error(module, layer), rel=1e-9, abs=1e-14)
        _, truncated = cp_truncated_exact_factors(layer.weight.detach(), rank)
        assert module.relative_squared_error <= truncated


def test_truncated_construction_error_is_the_dropped_energy_and_never_grows() -> None:
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = []
    for rank in range(1, cp_full_rank(tuple(w.shape)) + 1):
        factors, error = cp_truncated_exact_factors(w, rank)
        assert error == pytest.approx(relative_error(torch.einsum("or,ir,hr,wr->oihw", *factors), w) ** 2,
                                      rel=1e-9, abs=1e-15)
        errors.append(error)
    assert all(b <= a for a, b in zip(errors, errors[1:])) and errors[-1] == 0.0


@pytest.mark.parametrize("case", [LayerCase("Conv2d", 8, 6, (3, 3)), LayerCase("Conv1d", 6, 8, (5,)),
                                  LayerCase("Conv2d", 16, 16, (3, 3))], ids=str)
def test_error_never_grows_along_the_chain_grid(case: LayerCase) -> None:
    layer = case.build()
    chain = CP.chain(layer)
    assert chain.grid == sorted({math.ceil(k / 20 * chain.full - 1e-9) for k in range(1, 21)})
    errors = [chain.fit(r).relative_squared_error for r in chain.grid]
    assert all(b <= a for a, b in zip(errors, errors[1:])), list(zip(chain.grid, errors))
    # Between grid ranks: never worse than the grid rank below.
    for rank in range(chain.grid[0] + 1, chain.full, max(1, chain.full // 25)):
        below = max(g for g in chain.grid if g < rank)
        assert chain.fit(rank).relative_squared_error <= chain.fit(below).relative_squared_error


@pytest.mark.parametrize("case", [LayerCase("Conv2d", 8, 6, (3, 3)), LayerCase("Conv1d", 6, 8, (5,))], ids=str)
def test_error_decreases_with_rank(case: LayerCase) -> None:
    layer = case.build()
    full = CP.full_rank(layer)
    ranks = [max(1, full * k // 8) for k in range(1, 9)]
    errors = [CP.decompose(layer, r).relative_squared_error for r in ranks]
    assert all(b < a for a, b in zip(errors, errors[1:])), list(zip(ranks, errors))
    assert errors[-1] == 0.0


def test_decomposition_is_deterministic() -> None:
    layer = LayerCase("Conv2d", 6, 8, (3, 3)).build(torch.float32)
    first, second = CP.decompose(layer, 12), CP.decompose(layer, 12)
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)


def test_float32_layer_gets_float32_stages() -> None:
    layer = LayerCase("Conv2d", 4, 6, (3, 3)).build(torch.float32)
    module = CP.decompose(layer, 9)
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    reference = CP.decompose(LayerCase("Conv2d", 4, 6, (3, 3)).build(torch.float64), 9)
    assert relative_error(module.dense_weight(), reference.dense_weight()) <= 1e-6


# -- energy ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("energy", [0.5, 0.8, 0.95])
def test_energy_is_the_smallest_rank_meeting_the_target(energy: float) -> None:
    layer = LayerCase("Conv2d", 6, 4, (3, 3)).build()
    rank = CP.resolve_rank(layer, energy=energy)
    assert CP.relative_squared_error(layer, rank) <= 1 - energy
    # Bisection keeps R-1 as a probe that failed (or R = 1).
    assert rank == 1 or CP.relative_squared_error(layer, rank - 1) > 1 - energy
    assert _squared_error(CP.decompose(layer, rank), layer) <= 1 - energy + 1e-12


def test_energy_one_is_an_exact_fit() -> None:
    layer = LayerCase("Conv1d", 3, 4, (3,)).build()
    rank = CP.resolve_rank(layer, energy=1.0)
    # Like smallest_rank_for_energy, energy=1.0 allows 1e-12 of the squared norm (rounding).
    assert _squared_error(CP.decompose(layer, rank), layer) <= 1e-12


def test_energy_of_an_exactly_low_rank_weight_finds_its_rank() -> None:
    generator = torch.Generator().manual_seed(5)
    layer = nn.Conv2d(6, 8, 3, bias=False, dtype=torch.float64)
    factors = [torch.randn(size, 3, generator=generator, dtype=torch.float64) for size in (8, 6, 3, 3)]
    with torch.no_grad():
        layer.weight.copy_(torch.einsum("or,ir,hr,wr->oihw", *factors))
    assert CP.resolve_rank(layer, energy=0.999) <= 3


# -- memory and time ---------------------------------------------------------------------------------
_MEASURE = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    torch.set_num_threads(1)
    from convfactor.methods.cp import cp_factors
    channels, rank = int(sys.argv[1]), int(sys.argv[2])
    w = torch.randn(channels, channels, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.process_time()
    result = cp_factors(w, rank)
    print(json.dumps({"cpu_s": time.process_time() - start, "sweeps": result.sweeps,
                      "peak_delta_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
""")


def test_als_memory_and_time_stay_small() -> None:
    """256x256x3x3 at R=256 (the 512 case is benchmarks/cp_memory.py): no W x R intermediate.

    W x R would be 256*256*9*256 doubles = 1.2 GB; ALS needs ~(C*9*R) doubles per MTTKRP, ~5 MB here.
    CPU time, not wall time, so a loaded machine does not fail it; one thread, as measured.
    """
    measured = measure_in_subprocess(_MEASURE, "256", "256")
    assert measured["peak_delta_mib"] < 256, measured
    assert measured["cpu_s"] < 20, measured
    assert measured["sweeps"] >= 1


def test_a_zero_weight_decomposes_to_zero() -> None:
    layer = nn.Conv2d(4, 6, 3, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.zero_()
    for rank in (1, 10, 36):
        module = CP.decompose(layer, rank)
        assert module.relative_squared_error == 0.0 and torch.count_nonzero(module.dense_weight()) == 0
    assert CP.resolve_rank(layer, energy=0.9) == 1
