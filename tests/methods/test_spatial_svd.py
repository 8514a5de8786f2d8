"""Spatial SVD specifics: rank range, stage geometry, Eckart-Young error, energy, groups, rejections."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from convfactor.errors import RankError
from convfactor.methods import get_method
from convfactor.methods.spatial_svd import SpatialSVDConv, spatial_svd_factors
from convfactor.ranks import smallest_rank_for_energy

from .conftest import LayerCase, factorize, relative_error

SPATIAL_SVD = get_method("spatial_svd")


def _reshaped(weight: torch.Tensor) -> np.ndarray:
    """(C_out, C_in, k_h, k_w) -> (C_in*k_h, C_out*k_w), the matrix spatial SVD truncates."""
    c_out, c_in, k_h, k_w = weight.shape
    return weight.detach().numpy().transpose(1, 2, 0, 3).reshape(c_in * k_h, c_out * k_w)


@pytest.mark.parametrize(("case", "full"), [
    (LayerCase("Conv2d", 4, 6, (3, 3)), 12),  # min(4*3, 6*3)
    (LayerCase("Conv2d", 5, 3, (3, 3)), 9),  # C_out < k_h*k_w
    (LayerCase("Conv2d", 4, 6, (3, 3), groups=2), 6),  # per group: min(2*3, 3*3)
    (LayerCase("Conv2d", 3, 5, (2, 3)), 6),
    (LayerCase("Conv2d", 6, 4, (1, 1)), 4),
    (LayerCase("Conv1d", 4, 6, (3,)), 6),  # min(4*3, 6)
    (LayerCase("Conv1d", 5, 2, (3,)), 2),
])
def test_full_rank(case: LayerCase, full: int) -> None:
    layer = case.build()
    assert SPATIAL_SVD.full_rank(layer) == full
    with pytest.raises(RankError, match=rf"^spatial_svd: r={full + 1} is out of range \[1, {full}\]"):
        SPATIAL_SVD.resolve_rank(layer, rank=full + 1)


@pytest.mark.parametrize(("layer", "reason"), [
    (nn.Linear(4, 6), "not Linear (use svd)"),
    (nn.Conv2d(4, 8, 3, groups=4), "already depthwise"),
    (nn.Conv3d(4, 6, 3), "not Conv3d"),
])
def test_rejects_with_a_reason(layer: nn.Module, reason: str) -> None:
    assert reason in SPATIAL_SVD.unsupported_reason(layer)


def test_a_single_input_channel_is_not_depthwise() -> None:
    assert SPATIAL_SVD.unsupported_reason(nn.Conv2d(1, 8, 3)) is None


def test_from_conv_of_a_rejected_layer_raises_rank_error() -> None:
    with pytest.raises(RankError, match="^spatial_svd cannot represent this layer"):
        SpatialSVDConv.from_conv(nn.Linear(3, 3))


def test_stages_split_the_geometry_per_axis() -> None:
    layer = LayerCase("Conv2d", 4, 6, (3, 2), (2, 1), (1, 2), (2, 1), groups=2, padding_mode="reflect").build()
    module = factorize(SPATIAL_SVD, layer, rank=3)
    vertical, horizontal = module.vertical, module.horizontal
    assert [name for name, _ in module.named_children()] == ["vertical", "horizontal"]
    assert (vertical.in_channels, vertical.out_channels, vertical.groups) == (4, 6, 2)
    assert (vertical.kernel_size, vertical.stride, vertical.padding, vertical.dilation) == (
        (3, 1), (2, 1), (1, 0), (2, 1))
    assert (horizontal.kernel_size, horizontal.stride, horizontal.padding, horizontal.dilation) == (
        (1, 2), (1, 1), (0, 2), (1, 1))
    assert vertical.padding_mode == horizontal.padding_mode == "reflect"
    assert vertical.bias is None and horizontal.bias is not None


def test_conv1d_is_a_k_by_1_then_pointwise() -> None:
    module = factorize(SPATIAL_SVD, LayerCase("Conv1d", 4, 6, (3,), (2,), (1,)).build(), rank=2)
    assert module.vertical.kernel_size == (3,) and module.vertical.stride == (2,)
    assert module.horizontal.kernel_size == (1,) and module.horizontal.stride == (1,)
    assert module.horizontal.padding == (0,)


def test_error_is_the_discarded_singular_values() -> None:
    layer = LayerCase("Conv2d", 4, 5, (3, 3)).build()
    s = np.linalg.svd(_reshaped(layer.weight), compute_uv=False)
    for r in range(1, 13):
        expected = np.sqrt((s[r:] ** 2).sum() / (s**2).sum())
        actual = relative_error(factorize(SPATIAL_SVD, layer, rank=r).dense_weight(), layer.weight)
        assert abs(actual - expected) <= 1e-12


def test_separable_kernel_is_exact_at_rank_one() -> None:
    # W[o, i, h, w] = a[i, h] * b[o, w] is one singular triplet of the reshaped matrix.
    case = LayerCase("Conv2d", 3, 4, (3, 3), padding="same", dilation=(2, 1))
    layer = case.build()
    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4, 3, generator=g, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.einsum("ih,ow->oihw", a, b))
    assert SPATIAL_SVD.resolve_rank(layer, energy=1.0) == 1
    module = factorize(SPATIAL_SVD, layer, rank=1)
    x = case.input()
    assert relative_error(module(x), layer(x)) <= 1e-10


def test_energy_sums_the_groups_spectra() -> None:
    layer = LayerCase("Conv2d", 4, 6, (3, 3), groups=2).build()
    w = layer.weight.detach()
    s = [np.linalg.svd(_reshaped(w[3 * g: 3 * (g + 1)]), compute_uv=False) for g in range(2)]
    combined = np.sqrt(s[0] ** 2 + s[1] ** 2)
    for energy in (0.5, 0.9, 0.99):
        assert SPATIAL_SVD.resolve_rank(layer, energy=energy) == smallest_rank_for_energy(combined, energy)


def test_groups_are_factorized_independently() -> None:
    weight = LayerCase("Conv2d", 4, 6, (3, 3), groups=2).build().weight.detach()
    vertical, horizontal = spatial_svd_factors(weight, 2, groups=2)
    for g in range(2):
        v, h = spatial_svd_factors(weight[3 * g: 3 * (g + 1)], 2)
        assert torch.allclose(vertical[2 * g: 2 * (g + 1)].abs(), v.abs(), rtol=0, atol=1e-12)
        assert torch.allclose(horizontal[3 * g: 3 * (g + 1)].abs(), h.abs(), rtol=0, atol=1e-12)
