"""fold_batchnorm: eval-mode BN folded into the preceding conv/linear, exact; unsafe patterns left alone."""

import pytest
import torch
from torch import nn

from passes import annotate_shapes, capture, fold_batchnorm
from tests.nets import randomize_batchnorm


def _fold(model, x):
    gm = capture(model).graph_module
    annotate_shapes(gm, (x,))
    return fold_batchnorm(gm)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dims", [1, 2])
def test_conv_bn_fold_is_exact(affine, bias, dims):
    torch.manual_seed(0)
    conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(4, 6, 3, padding=1, bias=bias)
    bn = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(6, affine=affine)
    model = randomize_batchnorm(nn.Sequential(conv, bn, nn.ReLU())).double()
    x = torch.randn(2, 4, *([9] * dims), dtype=torch.float64)
    result = _fold(model, x)
    assert result.modified and result.changes == [["0", "1"]]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in result.graph_module.modules())
    expected = model(x)
    assert ((result.graph_module(x) - expected).norm() / expected.norm()) < 1e-12


def test_linear_bn1d_fold():
    torch.manual_seed(0)
    model = randomize_batchnorm(nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7))).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    result = _fold(model, x)
    assert result.changes == [["0", "1"]]
    torch.testing.assert_close(result.graph_module(x), model(x), rtol=1e-12, atol=1e-12)


class TwoUsers(nn.Module):
    """The conv output feeds the BN and a skip connection: folding would change the skip."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


@pytest.mark.parametrize("cls", [TwoUsers, SharedConv])
def test_unsafe_patterns_are_not_folded(cls):
    model = randomize_batchnorm(cls())
    x = torch.randn(1, 3, 5, 5)
    result = _fold(model, x)
    assert not result.modified
    torch.testing.assert_close(result.graph_module(x), model(x))


def test_batchnorm_without_running_stats_is_not_folded():
    model = nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3, track_running_stats=False)).eval()
    result = _fold(model, torch.randn(2, 3, 5, 5))
    assert not result.modified
