"""Shared helpers of the automatic-policy tests: small seeded networks and inputs (threads: tests/conftest.py)."""

from __future__ import annotations

import torch

from tests.nets import TinyResNet, randomize_batchnorm


def tiny_resnet(seed: int = 0, width: int = 8) -> torch.nn.Module:
    """TinyResNet with 8/16 channels and trained-looking BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    return randomize_batchnorm(TinyResNet(width=width), seed=seed)


def inputs(count: int, seed: int, size: int = 16) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))
