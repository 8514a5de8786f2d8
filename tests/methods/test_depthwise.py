"""Depthwise + pointwise (convfactor/methods/depthwise.py): structure, exactness, ranks, energy, reasons."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from convfactor.errors import RankError
from convfactor.methods import get_method
from convfactor.methods.depthwise import DepthwiseConv, depthwise_factors, depthwise_spectra

from .conftest import FLOAT32_TOLERANCE, FLOAT64_TOLERANCE, LayerCase, factorize, relative_error

DEPTHWISE = get_method("depthwise")
EVEN_SAME_WARNING = "ignore:Using padding='same' with even kernel lengths:UserWarning"


# -- which layers ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("layer", "reason"), [
    (nn.Linear(4, 6), "not Linear"),
    (nn.Conv2d(4, 8, 3, groups=4), "already depthwise"),
    (nn.Conv2d(4, 6, 1), "per-channel scale (use svd)"),
    (nn.Conv1d(4, 6, 1), "per-channel scale (use svd)"),
])
def test_unsupported_layers_have_reasons(layer: nn.Module, reason: str) -> None:
    assert reason in DEPTHWISE.unsupported_reason(layer)
    with pytest.raises(RankError, match="depthwise cannot represent this layer"):
        DepthwiseConv.from_conv(layer)


def test_grouped_and_single_channel_convs_are_supported() -> None:
    assert DEPTHWISE.unsupported_reason(nn.Conv2d(8, 6, 3, groups=2)) is None
    assert DEPTHWISE.unsupported_reason(nn.Conv2d(1, 6, 3)) is None  # groups == in_channels == 1


# -- ranks -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("layer", "full"), [
    (nn.Conv2d(4, 6, 3), 6),  # C_out < k_h*k_w
    (nn.Conv2d(4, 12, 3), 9),  # k_h*k_w < C_out
    (nn.Conv2d(8, 6, 3, groups=2), 3),  # C_out/g per input channel
    (nn.Conv1d(3, 5, 3), 3),
    (nn.Conv2d(3, 16, (2, 3)), 6),
])
def test_full_rank_is_min_of_group_outputs_and_kernel_volume(layer: nn.Module, full: int) -> None:
    assert DEPTHWISE.full_rank(layer) == full


def test_rank_out_of_range_names_m() -> None:
    with pytest.raises(RankError, match=r"^depthwise: m=7 is out of range \[1, 6\]"):
        DEPTHWISE.resolve_rank(nn.Conv2d(4, 6, 3), rank=7)
    assert DEPTHWISE.resolve_rank(nn.Conv2d(4, 12, 3), rank=0.5) == 5


# -- structure ---------------------------------------------------------------------------------------
def test_stages_keep_the_original_geometry() -> None:
    layer = nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(2, 1), padding_mode="circular")
    module = DEPTHWISE.decompose(layer, 3)
    assert list(dict(module.named_children())) == ["depthwise", "pointwise"]
    d, p = module.depthwise, module.pointwise
    assert (d.in_channels, d.out_channels, d.groups) == (4, 12, 4)
    assert (d.kernel_size, d.stride, d.padding, d.dilation, d.padding_mode) == (
        (3, 5), (2, 1), (1, 2), (2, 1), "circular")
    assert d.bias is None
    assert (p.in_channels, p.out_channels, p.kernel_size, p.groups) == (12, 6, (1, 1), 1)
    assert p.bias is not None


def test_grouped_conv_gets_a_grouped_pointwise_stage() -> None:
    module = DEPTHWISE.decompose(nn.Conv2d(8, 6, 3, groups=2, bias=False), 2)
    assert module.depthwise.groups == 8 and module.depthwise.out_channels == 16
    assert module.pointwise.groups == 2 and module.pointwise.in_channels == 16
    assert module.pointwise.bias is None


def test_depthwise_output_channels_are_ordered_by_input_channel() -> None:
    # Output channel c*m + j of the depthwise stage must read input channel c only.
    layer = LayerCase("Conv2d", 3, 5, (3, 3), padding=(1, 1)).build()
    module = DEPTHWISE.decompose(layer, 2)
    x = torch.zeros(1, 3, 6, 6, dtype=torch.float64)
    x[:, 1] = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        energy = module.depthwise(x).pow(2).sum(dim=(0, 2, 3))
    assert torch.all(energy[[0, 1, 4, 5]] == 0) and torch.all(energy[[2, 3]] > 0)


# -- exactness at full rank --------------------------------------------------------------------------
EXACT_CASES = [
    LayerCase("Conv2d", 4, 6, (3, 3), stride=(2, 1), padding=(1, 1)),
    LayerCase("Conv2d", 5, 3, (2, 4), padding="same", bias=False),  # even kernel, C_out < k_h*k_w
    LayerCase("Conv2d", 4, 12, (3, 3), padding=(1, 2), dilation=(2, 1), padding_mode="reflect"),
    LayerCase("Conv2d", 6, 4, (3, 3), stride=(2, 2), padding=(1, 1), groups=2, padding_mode="circular"),
    LayerCase("Conv2d", 3, 4, (3, 1), padding=(1, 0), padding_mode="replicate"),
    LayerCase("Conv1d", 3, 2, (5,), padding=(2,)),
    LayerCase("Conv1d", 4, 6, (3,), stride=(2,), padding=(1,), dilation=(2,)),
]


@pytest.mark.filterwarnings(EVEN_SAME_WARNING)
@pytest.mark.parametrize("case", EXACT_CASES, ids=str)
def test_full_rank_is_exact(case: LayerCase) -> None:
    for dtype, tolerance in ((torch.float64, FLOAT64_TOLERANCE), (torch.float32, FLOAT32_TOLERANCE)):
        layer = case.build(dtype)
        module = factorize(DEPTHWISE, layer, rank=1.0)
        x = case.input(dtype)
        with torch.no_grad():
            assert relative_error(module(x), layer(x)) <= tolerance
        assert relative_error(module.dense_weight(), layer.weight) <= tolerance
        assert {p.dtype for p in module.parameters()} == {dtype}


# -- below full rank and energy ----------------------------------------------------------------------
def _per_channel_singular_values(weight: torch.Tensor, groups: int) -> np.ndarray:
    """Reference: SVD of each input channel's (C_out/g, K) slice, computed channel by channel."""
    w = weight.detach().numpy()
    c_out, c_in_g = w.shape[:2]
    rows = []
    for q in range(groups):
        for j in range(c_in_g):
            block = w[q * c_out // groups:(q + 1) * c_out // groups, j].reshape(c_out // groups, -1)
            rows.append(np.linalg.svd(block, compute_uv=False))
    return np.array(rows)


@pytest.mark.parametrize("case", [LayerCase("Conv2d", 4, 12, (3, 3)), LayerCase("Conv2d", 6, 8, (3, 3), groups=2)],
                         ids=str)
def test_error_is_the_dropped_singular_energy_and_decreases(case: LayerCase) -> None:
    layer = case.build()
    s2 = _per_channel_singular_values(layer.weight, case.groups) ** 2
    np.testing.assert_allclose(depthwise_spectra(layer.weight, case.groups) ** 2, s2, rtol=1e-12)
    errors = []
    for m in range(1, DEPTHWISE.full_rank(layer) + 1):
        error = relative_error(DEPTHWISE.decompose(layer, m).dense_weight(), layer.weight) ** 2
        assert error == pytest.approx(s2[:, m:].sum() / s2.sum(), rel=1e-9, abs=1e-15)
        errors.append(error)
    assert all(b < a for a, b in zip(errors, errors[1:])) and errors[-1] <= FLOAT64_TOLERANCE**2


@pytest.mark.parametrize("energy", [0.3, 0.7, 0.9, 0.99, 1.0])
def test_energy_is_the_smallest_multiplier_keeping_it_over_all_channels(energy: float) -> None:
    layer = LayerCase("Conv2d", 4, 12, (3, 3)).build()
    s2 = _per_channel_singular_values(layer.weight, 1) ** 2
    kept = np.cumsum(s2.sum(axis=0)) / s2.sum()
    expected = int(np.argmax(kept >= energy - 1e-12)) + 1
    assert DEPTHWISE.resolve_rank(layer, energy=energy) == expected


def test_factors_have_documented_shapes() -> None:
    # (C_out, C_in/g, k_h, k_w) = (6, 4, 3, 2) with g=2: C_in = 8, m = 3.
    weight = torch.randn(6, 4, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    depthwise, pointwise = depthwise_factors(weight, 3, groups=2)
    assert depthwise.shape == (8 * 3, 1, 3, 2)
    assert pointwise.shape == (6, 4 * 3, 1, 1)
