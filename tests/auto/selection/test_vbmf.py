"""VBMF rank estimation: recovers the rank of low-rank-plus-noise matrices and finds nothing in noise."""

import numpy as np
import pytest
import torch
from torch import nn

from convfactor.auto.selection.vbmf import vbmf_layer_rank, vbmf_noise_variance, vbmf_rank
from convfactor.errors import RankError


def low_rank_plus_noise(rows, cols, rank, noise, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, rank)) @ rng.normal(size=(rank, cols)) + noise * rng.normal(size=(rows, cols))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("rows, cols, rank, noise", [(40, 60, 5, 0.1), (60, 40, 3, 0.5), (50, 50, 8, 0.3)])
def test_recovers_the_rank_of_low_rank_plus_noise(rows, cols, rank, noise, seed):
    y = low_rank_plus_noise(rows, cols, rank, noise, seed)
    assert vbmf_rank(y) == rank
    assert vbmf_rank(torch.from_numpy(y.T)) == rank  # orientation and type do not matter
    assert vbmf_rank(y, sigma2=noise**2) == rank
    # The estimated noise variance is the true one within 20%.
    assert abs(vbmf_noise_variance(y) / noise**2 - 1) < 0.2


@pytest.mark.parametrize("seed", range(3))
def test_pure_noise_has_rank_zero(seed):
    assert vbmf_rank(np.random.default_rng(seed).normal(size=(30, 50))) == 0


def test_layer_ranks_follow_the_methods_matrices():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, bias=False).double()
    # A spatial-SVD matrix (C_in*k_h, C_out*k_w) = (48, 72) of rank 4, plus small noise.
    u, v = torch.randn(48, 4, dtype=torch.float64), torch.randn(4, 72, dtype=torch.float64)
    matrix = u @ v + 0.01 * torch.randn(48, 72, dtype=torch.float64)
    with torch.no_grad():
        # (C_in, k_h, C_out, k_w) -> (C_out, C_in, k_h, k_w)
        conv.weight.copy_(matrix.reshape(16, 3, 24, 3).permute(2, 0, 1, 3))
    assert vbmf_layer_rank("spatial_svd", conv) == 4
    r_in, r_out = vbmf_layer_rank("tucker2", conv)
    assert 1 <= r_in <= 16 and 1 <= r_out <= 24
    linear = nn.Linear(30, 20).double()
    with torch.no_grad():
        linear.weight.copy_(torch.randn(20, 2, dtype=torch.float64) @ torch.randn(2, 30, dtype=torch.float64))
    assert vbmf_layer_rank("svd", linear) == 2
    with pytest.raises(RankError, match="vbmf ranks are defined for"):
        vbmf_layer_rank("cp", conv)
