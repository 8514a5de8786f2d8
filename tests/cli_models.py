"""Small architectures and factories for the CLI, checkpoint and serialize tests (``--arch tests.cli_models:...``)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "TinyNet",
    "tiny_net",
    "tiny_net_with_shape",
    "LinearBNNet",
    "linear_bn_net",
    "Gate",
    "GatedNet",
    "gated_net",
    "no_conv_net",
    "not_a_module",
    "raising_factory",
    "randomized",
]


class TinyNet(nn.Module):
    """conv/bn/relu, a strided conv, a 1x1 conv, global pool, Linear: every layer kind the CLI meets."""

    def __init__(self, width: int = 8, num_classes: int = 4, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.proj = nn.Conv2d(2 * width, 2 * width, 1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.proj(x))
        return self.fc(x.mean(dim=(2, 3)))


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded weights and non-trivial BatchNorm statistics, as after training; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.3)
    return model.eval()


def tiny_net(width: int = 8, num_classes: int = 4, in_channels: int = 3) -> TinyNet:
    """The factory ``--arch tests.cli_models:tiny_net`` (no declared input shape)."""
    return TinyNet(width, num_classes, in_channels)


def tiny_net_with_shape(width: int = 8) -> TinyNet:
    """Like ``tiny_net``, but the factory declares its input shape, so ``--input-shape`` may be left out."""
    return TinyNet(width)


tiny_net_with_shape.input_shape = (1, 3, 8, 8)


class LinearBNNet(nn.Module):
    """conv -> pool -> Linear -> BatchNorm1d -> Linear: folding a BatchNorm after a Linear needs traced shapes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 12)
        self.bn = nn.BatchNorm1d(12)
        self.fc2 = nn.Linear(12, 4)

    def forward(self, x):
        x = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def linear_bn_net() -> LinearBNNet:
    return LinearBNNet()


class Gate(nn.Module):
    """Python control flow on a tensor value: torch.fx cannot trace through it."""

    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = Gate()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.gate(self.conv1(x))).mean(dim=(2, 3))


def gated_net() -> GatedNet:
    return GatedNet()


def no_conv_net() -> nn.Module:
    """A model without Conv/Linear layers: no policy can match anything."""
    return nn.Sequential(nn.ReLU(), nn.Flatten())


def not_a_module() -> dict:
    """A factory returning something else than a module (an ``--arch`` mistake)."""
    return {"conv": 1}


def raising_factory() -> nn.Module:
    raise RuntimeError("cannot build this model")
