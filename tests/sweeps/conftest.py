"""A small network and data every sweep test shares, and options that keep an automatic run to seconds."""

import pytest
import torch

from convfactor.auto import AutoOptions
from tests.nets import TinyResNet

# One method and a short rank grid: the sharing and the reductions are what these tests look at.
FAST = AutoOptions(auto_methods=("spatial_svd",), fractions=(0.25, 0.5, 0.75, 1.0), speed_check=False)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return TinyResNet(width=4).eval()


@pytest.fixture(scope="module")
def data():
    """40 samples: 30 fit, 5 select, 5 check (``convfactor.auto.statistics.split``)."""
    return torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(1))
