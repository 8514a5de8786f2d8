"""The small network, data and policy the distillation tests share."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import convfactor

__all__ = ["CUT", "small_net", "data", "quiet_factorize"]

CUT = {"rules": [{"types": ["Conv2d"], "method": "spatial_svd"}], "target": {"macs": 0.3},
       "fidelity": {"outputs": {0: {"kind": "scores"}}}}


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10)).eval()


def data(count: int = 96, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def quiet_factorize(*args, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convfactor.factorize(*args, **kwargs)
