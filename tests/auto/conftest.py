"""Shared helpers of the automatic-policy tests: small seeded networks and inputs, one intra-op thread."""

from __future__ import annotations

import pytest
import torch

from tests.nets import TinyResNet, randomize_batchnorm


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny convolutions run ~10x faster on one thread on a loaded 2-core machine; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_resnet(seed: int = 0, width: int = 8) -> torch.nn.Module:
    """TinyResNet with 8/16 channels and trained-looking BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    return randomize_batchnorm(TinyResNet(width=width), seed=seed)


def inputs(count: int, seed: int, size: int = 16) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))
