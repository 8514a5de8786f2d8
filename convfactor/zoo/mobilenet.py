"""A small MobileNet-v1-style network for 32x32 inputs, mixing depthwise-separable and regular 3x3 convs.

Layout (channels at width 1.0, resolution for a 32x32 input):

    stem       3x3 conv  in -> 32                          32x32
    features.0 depthwise-separable 32 -> 64, stride 2      16x16
    features.1 regular 3x3 conv 64 -> 64                   16x16
    features.2 depthwise-separable 64 -> 128               16x16
    features.3 depthwise-separable 128 -> 128, stride 2     8x8
    features.4 regular 3x3 conv 128 -> 128                  8x8
    features.5 depthwise-separable 128 -> 256               8x8
    features.6 depthwise-separable 256 -> 256               8x8
    avgpool, fc 256 -> num_classes

Every conv is followed by BN and ReLU. The regular 3x3 convs give factorization methods dense
kernels to work on next to depthwise (``groups == channels``) and pointwise (1x1) convs, which
they must leave alone or treat as 1x1. Traceable with ``torch.fx.symbolic_trace``.

Example:
    >>> mobilenet_cifar(num_classes=10)(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 10])
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConvfactorError

__all__ = ["ConvBNReLU", "DepthwiseSeparable", "MobileNetCIFAR", "mobilenet_cifar", "scaled_channels"]

# (kind, output channels at width 1.0, stride) per entry of ``features``.
_LAYOUT: tuple[tuple[str, int, int], ...] = (
    ("separable", 64, 2),
    ("regular", 64, 1),
    ("separable", 128, 1),
    ("separable", 128, 2),
    ("regular", 128, 1),
    ("separable", 256, 1),
    ("separable", 256, 1),
)
_STEM_CHANNELS = 32


def scaled_channels(channels: int, width: float) -> int:
    """Channels times ``width``, rounded to the nearest multiple of 8 (at least 8), as in MobileNet.

    Args:
        channels: channel count at width 1.0.
        width: width multiplier, > 0.
    Returns:
        The scaled channel count.
    """
    return max(8, int(round(channels * width / 8)) * 8)


class ConvBNReLU(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU; ``groups == in_channels`` makes it depthwise.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel size; padding keeps the resolution (divided by ``stride``).
        stride: conv stride.
        groups: conv groups.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class DepthwiseSeparable(nn.Module):
    """A depthwise 3x3 conv (carrying the stride) then a pointwise 1x1 conv, each with BN and ReLU.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the depthwise conv.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.depthwise = ConvBNReLU(in_channels, in_channels, 3, stride=stride, groups=in_channels)
        self.pointwise = ConvBNReLU(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class MobileNetCIFAR(nn.Module):
    """The network laid out in the module docstring.

    Args:
        num_classes: outputs of ``fc``.
        in_channels: input image channels.
        width: channel multiplier applied to every layer (rounded to multiples of 8).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        channels = scaled_channels(_STEM_CHANNELS, width)
        self.stem = ConvBNReLU(in_channels, channels, 3)
        blocks: list[nn.Module] = []
        for kind, base_channels, stride in _LAYOUT:
            out_channels = scaled_channels(base_channels, width)
            if kind == "separable":
                blocks.append(DepthwiseSeparable(channels, out_channels, stride))
            else:
                blocks.append(ConvBNReLU(channels, out_channels, 3, stride=stride))
            channels = out_channels
        self.features = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stem(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def mobilenet_cifar(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> MobileNetCIFAR:
    """Build the small MobileNet for 32x32 inputs.

    Args:
        num_classes: outputs of the classifier.
        in_channels: input image channels.
        width: channel multiplier, > 0 (channels rounded to multiples of 8, at least 8).
    Returns:
        An untrained network (about 0.32 M parameters and 30 M MACs at 32x32, width 1.0).
    """
    if not width > 0:
        raise ConvfactorError(f"mobilenet_cifar: width must be > 0, got {width}")
    return MobileNetCIFAR(num_classes, in_channels, width)
