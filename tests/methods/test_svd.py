"""SVD of 1x1 convs and Linear layers: structure, Eckart-Young error, borders, Linear, energy, groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from convfactor.errors import RankError
from convfactor.methods import get_method
from convfactor.methods.svd import SVDLayer, svd_factors
from convfactor.ranks import smallest_rank_for_energy

from .conftest import LayerCase, factorize, relative_error

SVD = get_method("svd")


@pytest.mark.parametrize(("layer", "reason"), [
    (nn.Conv2d(4, 6, 3), "svd needs a 1x1 conv or Linear; use spatial_svd/tucker2 for k x k"),
    (nn.Conv2d(4, 6, (1, 3)), "svd needs a 1x1 conv or Linear"),
    (nn.Conv1d(4, 6, 2), "svd needs a 1x1 conv or Linear"),
    (nn.Conv2d(4, 8, 1, groups=4), "already depthwise"),
    (nn.Conv3d(4, 6, 1), "not Conv3d"),
    (nn.Bilinear(3, 3, 2), "not Bilinear"),
])
def test_rejects_with_a_reason(layer: nn.Module, reason: str) -> None:
    assert reason in SVD.unsupported_reason(layer)


@pytest.mark.parametrize("layer", [
    nn.Linear(3, 5), nn.Conv2d(4, 6, 1, stride=2, padding=1), nn.Conv1d(4, 6, 1, padding="same"),
    nn.Conv2d(4, 6, 1, groups=2, padding_mode="reflect", padding=1), nn.Conv2d(1, 4, 1),
])
def test_accepts_pointwise_layers(layer: nn.Module) -> None:
    assert SVD.unsupported_reason(layer) is None


@pytest.mark.parametrize(("case", "full"), [
    (LayerCase("Linear", 7, 5), 5),
    (LayerCase("Linear", 3, 8), 3),
    (LayerCase("Conv2d", 6, 9, (1, 1)), 6),
    (LayerCase("Conv2d", 8, 6, (1, 1), groups=2), 3),
    (LayerCase("Conv1d", 4, 2, (1,)), 2),
])
def test_rank_range_is_min_channels_per_group(case: LayerCase, full: int) -> None:
    layer = case.build()
    assert SVD.full_rank(layer) == full
    assert SVD.resolve_rank(layer, rank=1) == 1
    assert SVD.resolve_rank(layer, rank=full) == full
    with pytest.raises(RankError, match=rf"^svd: r={full + 1} is out of range \[1, {full}\]"):
        SVD.resolve_rank(layer, rank=full + 1)


def test_from_conv_of_a_kxk_conv_raises_rank_error() -> None:
    with pytest.raises(RankError, match="^svd cannot represent this layer: svd needs a 1x1 conv or Linear"):
        SVDLayer.from_conv(nn.Conv2d(4, 6, 3))


def test_linear_becomes_two_linears() -> None:
    case = LayerCase("Linear", 7, 5)
    layer = case.build()
    module = factorize(SVD, layer, rank=2)
    assert [name for name, _ in module.named_children()] == ["first", "second"]
    assert type(module.first) is nn.Linear and type(module.second) is nn.Linear
    assert (module.first.in_features, module.first.out_features, module.first.bias) == (7, 2, None)
    assert (module.second.in_features, module.second.out_features) == (2, 5)
    assert module.dense_weight().shape == (5, 7)
    x = case.input()  # (2, 3, 7): extra leading dims pass through
    expected = x @ module.dense_weight().T + layer.bias
    assert relative_error(module(x), expected) <= 1e-12


def test_conv_stages_first_carries_the_geometry() -> None:
    layer = LayerCase("Conv2d", 8, 6, (1, 1), (2, 1), (1, 2), groups=2, padding_mode="circular").build()
    module = factorize(SVD, layer, rank=2)
    first, second = module.first, module.second
    assert (first.in_channels, first.out_channels, first.groups) == (8, 4, 2)
    assert (first.stride, first.padding, first.padding_mode, first.bias) == ((2, 1), (1, 2), "circular", None)
    assert (second.in_channels, second.out_channels, second.groups) == (4, 6, 2)
    assert (second.kernel_size, second.stride, second.padding) == ((1, 1), (1, 1), (0, 0))
    assert second.bias is not None


def test_error_is_the_discarded_singular_values() -> None:
    # Eckart-Young: the rank-r truncation's squared error is the sum of the discarded s_i^2.
    layer = LayerCase("Conv2d", 6, 9, (1, 1)).build()
    s = np.linalg.svd(layer.weight.detach().numpy().reshape(9, 6), compute_uv=False)
    for r in range(1, 7):
        expected = np.sqrt((s[r:] ** 2).sum() / (s**2).sum())
        actual = relative_error(factorize(SVD, layer, rank=r).dense_weight(), layer.weight)
        assert abs(actual - expected) <= 1e-12


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular", "replicate"])
def test_truncated_padded_conv_equals_its_dense_weight(padding_mode: str) -> None:
    case = LayerCase("Conv2d", 6, 5, (1, 1), (2, 1), (2, 1), padding_mode=padding_mode)
    layer = case.build()
    module = factorize(SVD, layer, rank=2)
    equivalent = case.build()
    with torch.no_grad():
        equivalent.weight.copy_(module.dense_weight())
        x = case.input()
        out = module(x)
        assert relative_error(out, equivalent(x)) <= 1e-12
        if padding_mode == "zeros":
            # Zero-padded border pixels come out as exactly the bias, as in the original layer.
            border = out[:, :, :, 0]
            assert torch.allclose(border, layer.bias[None, :, None].expand_as(border), rtol=0, atol=1e-14)
            assert torch.allclose(border, layer(x)[:, :, :, 0], rtol=0, atol=1e-14)


def test_energy_uses_the_singular_values() -> None:
    layer = LayerCase("Linear", 8, 6).build()
    s = np.linalg.svd(layer.weight.detach().numpy(), compute_uv=False)
    for energy in (0.4, 0.8, 0.95, 1.0):
        assert SVD.resolve_rank(layer, energy=energy) == smallest_rank_for_energy(s, energy)


def test_exact_at_the_weights_rank() -> None:
    layer = LayerCase("Conv1d", 6, 7, (1,)).build()
    g = torch.Generator().manual_seed(3)
    low_rank = torch.randn(7, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 6, generator=g,
                                                                                  dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(low_rank[:, :, None])
    assert SVD.resolve_rank(layer, energy=1.0) == 2
    assert relative_error(factorize(SVD, layer, rank=2).dense_weight(), layer.weight) <= 1e-10


def test_groups_are_factorized_independently() -> None:
    grouped = LayerCase("Conv2d", 8, 6, (1, 1), groups=2, bias=False).build()
    dense = factorize(SVD, grouped, rank=1).dense_weight()
    for g in range(2):
        block = grouped.weight.detach()[3 * g: 3 * (g + 1)]
        first, second = svd_factors(block, 1)
        assert relative_error(dense[3 * g: 3 * (g + 1)], (second @ first).reshape(block.shape)) <= 1e-12


def test_factor_shapes() -> None:
    first, second = svd_factors(torch.randn(6, 4, 1, 1, dtype=torch.float64), 3, groups=2)
    assert first.shape == (6, 4) and second.shape == (6, 3)
