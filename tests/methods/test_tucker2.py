"""Tucker-2 specifics: structure, rank meaning, truncation, energy, HOOI, groups and rejections."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from convfactor.errors import RankError
from convfactor.methods import get_method
from convfactor.methods.tucker2 import DEFAULT_HOOI_ITERATIONS, Tucker2, Tucker2Conv, tucker2_factors
from convfactor.ranks import smallest_rank_for_energy

from .conftest import LayerCase, factorize, relative_error

TUCKER2 = get_method("tucker2")


def _low_multilinear_rank_weight(c_out: int, c_in: int, kernel: tuple[int, ...], r_in: int, r_out: int,
                                 seed: int = 0) -> torch.Tensor:
    """W = G x_0 A x_1 B with G (r_out, r_in, *k): its mode ranks are exactly (r_in, r_out)."""
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(r_out, r_in, *kernel, generator=g, dtype=torch.float64)
    a = torch.randn(c_out, r_out, generator=g, dtype=torch.float64)
    b = torch.randn(c_in, r_in, generator=g, dtype=torch.float64)
    return torch.einsum("rs...,or,is->oi...", core, a, b)


def _conv_with_weight(weight: torch.Tensor, **kwargs) -> nn.Module:
    cls = nn.Conv1d if weight.dim() == 3 else nn.Conv2d
    layer = cls(weight.shape[1] * kwargs.get("groups", 1), weight.shape[0], tuple(weight.shape[2:]),
                dtype=torch.float64, **kwargs)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def test_registered_with_documented_rank_meaning() -> None:
    assert isinstance(TUCKER2, Tucker2)
    assert TUCKER2.rank_component_names() == ("r_in", "r_out")
    assert "min(r, C_in/g)" in TUCKER2.rank_meaning and "min(r, C_out/g)" in TUCKER2.rank_meaning
    assert TUCKER2.hooi_iterations == DEFAULT_HOOI_ITERATIONS == 0


@pytest.mark.parametrize(("case", "full"), [
    (LayerCase("Conv2d", 4, 6, (3, 3)), (4, 6)),
    (LayerCase("Conv2d", 8, 6, (3, 3), groups=2), (4, 3)),
    (LayerCase("Conv1d", 5, 2, (3,)), (5, 2)),
    (LayerCase("Conv2d", 6, 4, (1, 1)), (6, 4)),
])
def test_full_rank_is_channels_per_group(case: LayerCase, full: tuple[int, int]) -> None:
    layer = case.build()
    assert TUCKER2.full_rank(layer) == full
    assert TUCKER2.resolve_rank(layer, rank=1000) == full  # an int is capped per mode


@pytest.mark.parametrize(("layer", "reason"), [
    (nn.Linear(4, 6), "not Linear (use svd)"),
    (nn.Conv2d(4, 8, 3, groups=4), "already depthwise"),
    (nn.Conv1d(3, 3, 3, groups=3), "already depthwise"),
    (nn.Conv3d(4, 6, 3), "not Conv3d"),
    (nn.ReLU(), "not ReLU"),
])
def test_rejects_with_a_reason(layer: nn.Module, reason: str) -> None:
    assert reason in TUCKER2.unsupported_reason(layer)


def test_from_conv_of_a_rejected_layer_raises_rank_error() -> None:
    with pytest.raises(RankError, match="^tucker2 cannot represent this layer: already depthwise"):
        Tucker2Conv.from_conv(nn.Conv2d(4, 4, 3, groups=4))


def test_stages_keep_the_geometry() -> None:
    layer = LayerCase("Conv2d", 8, 6, (3, 2), (2, 1), (1, 2), (2, 1), groups=2, padding_mode="circular").build()
    module = factorize(TUCKER2, layer, rank=(3, 2))
    assert [name for name, _ in module.named_children()] == ["project_in", "core", "project_out"]
    project_in, core, project_out = module.project_in, module.core, module.project_out
    assert (project_in.in_channels, project_in.out_channels, project_in.kernel_size) == (8, 6, (1, 1))
    assert (core.in_channels, core.out_channels, core.kernel_size) == (6, 4, (3, 2))
    assert (project_out.in_channels, project_out.out_channels, project_out.kernel_size) == (4, 6, (1, 1))
    assert (core.stride, core.padding, core.dilation, core.padding_mode) == ((2, 1), (1, 2), (2, 1), "circular")
    assert project_in.groups == core.groups == project_out.groups == 2
    assert project_in.stride == project_out.stride == (1, 1) and project_in.padding == (0, 0)
    assert project_in.bias is None and core.bias is None and project_out.bias is not None
    assert module.rank == (3, 2)


def test_projections_are_orthonormal() -> None:
    layer = LayerCase("Conv2d", 8, 6, (3, 3), groups=2).build()
    module = factorize(TUCKER2, layer, rank=(3, 2))
    u_in = module.project_in.weight.detach().reshape(2, 3, 4)  # (g, r_in, C_in/g)
    u_out = module.project_out.weight.detach().reshape(2, 3, 2)  # (g, C_out/g, r_out)
    eye = torch.eye(3, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    assert torch.allclose(u_in @ u_in.transpose(1, 2), eye[0].expand(2, 3, 3), rtol=0, atol=1e-12)
    assert torch.allclose(u_out.transpose(1, 2) @ u_out, eye[1].expand(2, 2, 2), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("kernel", "r_in", "r_out"), [((3, 3), 2, 3), ((3,), 3, 1), ((1, 1), 2, 2)])
def test_exact_at_the_weights_multilinear_rank(kernel: tuple[int, ...], r_in: int, r_out: int) -> None:
    weight = _low_multilinear_rank_weight(7, 6, kernel, r_in, r_out)
    layer = _conv_with_weight(weight, padding="same")
    assert TUCKER2.resolve_rank(layer, energy=1.0) == (r_in, r_out)
    module = factorize(TUCKER2, layer, rank=(r_in, r_out))
    assert relative_error(module.dense_weight(), weight) <= 1e-10
    x = torch.randn(2, 6, *([7] * len(kernel)), dtype=torch.float64)
    assert relative_error(module(x), layer(x)) <= 1e-10
    # One rank short in either mode is not exact.
    for rank in ((r_in - 1, r_out), (r_in, r_out - 1)):
        if min(rank) == 0:
            continue
        assert relative_error(factorize(TUCKER2, layer, rank=rank).dense_weight(), weight) > 1e-3


def test_energy_is_per_mode_unfolding_spectrum() -> None:
    layer = LayerCase("Conv2d", 6, 5, (3, 3)).build()
    w = layer.weight.detach().numpy()
    s_out = np.linalg.svd(w.reshape(5, -1), compute_uv=False)  # mode 0: (C_out, C_in*K)
    s_in = np.linalg.svd(w.transpose(1, 0, 2, 3).reshape(6, -1), compute_uv=False)  # mode 1: (C_in, C_out*K)
    for energy in (0.3, 0.7, 0.9, 0.99):
        expected = (smallest_rank_for_energy(s_in, energy), smallest_rank_for_energy(s_out, energy))
        assert TUCKER2.resolve_rank(layer, energy=energy) == expected


def test_truncation_error_is_the_hosvd_projection_error() -> None:
    # HOSVD: W_hat = W x_0 P_out x_1 P_in with P the projectors onto the leading singular vectors.
    layer = LayerCase("Conv2d", 6, 5, (3, 3)).build()
    w = layer.weight.detach()
    u_out = torch.linalg.svd(w.reshape(5, -1))[0][:, :2]
    u_in = torch.linalg.svd(w.transpose(0, 1).reshape(6, -1))[0][:, :3]
    expected = torch.einsum("oihw,po,qi->pqhw", w, u_out @ u_out.T, u_in @ u_in.T)
    module = factorize(TUCKER2, layer, rank=(3, 2))
    assert relative_error(module.dense_weight(), expected) <= 1e-12


def test_hooi_never_fits_worse_than_hosvd_and_stays_exact() -> None:
    hooi = Tucker2(hooi_iterations=3)
    for case in (LayerCase("Conv2d", 6, 5, (3, 3)), LayerCase("Conv2d", 12, 2, (3, 3)),
                 LayerCase("Conv1d", 8, 4, (2,), groups=2)):
        layer = case.build()
        w = layer.weight
        full = TUCKER2.full_rank(layer)
        assert relative_error(hooi.decompose(layer, full).dense_weight(), w) <= 1e-10
        for rank in ((1, 1), (2, 1), (full[0] - 1, full[1]), (full[0], max(1, full[1] - 1))):
            e_hosvd = relative_error(TUCKER2.decompose(layer, rank).dense_weight(), w)
            e_hooi = relative_error(hooi.decompose(layer, rank).dense_weight(), w)
            assert e_hooi <= e_hosvd + 1e-12, rank


def test_rank_beyond_the_other_modes_size_completes_the_basis() -> None:
    # 12 input channels but C_out*K = 9: the mode-1 SVD has 9 vectors, full rank needs 12.
    layer = LayerCase("Conv2d", 12, 1, (3, 3)).build()
    for method in (TUCKER2, Tucker2(hooi_iterations=2)):
        module = method.decompose(layer, (12, 1))
        u_in = module.project_in.weight.detach().reshape(12, 12)
        assert torch.allclose(u_in @ u_in.T, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-12)
        assert relative_error(module.dense_weight(), layer.weight) <= 1e-10
        assert module.dense_weight().shape == layer.weight.shape
        method.decompose(layer, (10, 1))  # HOOI's projected unfolding is (12, 9) here too


def test_groups_are_factorized_independently() -> None:
    grouped = LayerCase("Conv2d", 8, 6, (3, 3), groups=2, bias=False).build()
    dense = factorize(TUCKER2, grouped, rank=(2, 2)).dense_weight()
    for g in range(2):
        part = _conv_with_weight(grouped.weight.detach()[3 * g: 3 * (g + 1)])
        expected = factorize(TUCKER2, part, rank=(2, 2)).dense_weight()
        assert relative_error(dense[3 * g: 3 * (g + 1)], expected) <= 1e-12


def test_truncated_module_matches_its_dense_weight() -> None:
    case = LayerCase("Conv2d", 6, 4, (3, 3), (1, 1), "same", (2, 2), padding_mode="reflect")
    layer = case.build()
    module = factorize(TUCKER2, layer, rank=(2, 3))
    equivalent = case.build()
    with torch.no_grad():
        equivalent.weight.copy_(module.dense_weight())
    x = case.input()
    assert relative_error(module(x), equivalent(x)) <= 1e-10


def test_factor_shapes_1d() -> None:
    weight = torch.randn(6, 2, 3, dtype=torch.float64)  # a Conv1d with groups=2 and C_in=4
    project_in, core, project_out = tucker2_factors(weight, (2, 1), groups=2)
    assert project_in.shape == (4, 2, 1) and core.shape == (2, 2, 3) and project_out.shape == (6, 1, 1)
