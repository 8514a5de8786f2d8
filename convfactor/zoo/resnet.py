"""Reference ResNets: CIFAR ResNet-20, ImageNet-shaped ResNet-18, and ResNet-18 with a CIFAR stem.

Module names follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``,
``fc``) so users recognize them in reports and policies. Shortcuts whose shape changes are option-B
projections (1x1 conv + BN), never zero-padding, so every model traces with ``torch.fx.symbolic_trace``
and contains 1x1 convs for the SVD method to meet. No control flow depends on data.

Example:
    >>> model = resnet20(num_classes=10)
    >>> model(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 10])
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "ResNet", "resnet20", "resnet18", "resnet18_cifar"]


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with a residual connection; a 1x1 conv+BN projection when shape changes.

    Args:
        in_channels: channels entering the block.
        out_channels: channels leaving the block.
        stride: stride of the first 3x3 conv (and of the projection).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A ResNet of BasicBlocks: stem, one ``layer{i}`` per stage, global average pool, ``fc``.

    Args:
        stage_channels: output channels of each stage; stages after the first halve the resolution.
        blocks_per_stage: BasicBlocks in every stage.
        num_classes: outputs of ``fc``.
        in_channels: input image channels.
        imagenet_stem: True for the 7x7/2 conv + 3x3/2 max-pool stem (224x224 inputs), False for a
            3x3/1 conv stem without pooling (32x32 inputs).
    """

    def __init__(
        self,
        stage_channels: tuple[int, ...],
        blocks_per_stage: tuple[int, ...],
        num_classes: int,
        in_channels: int,
        imagenet_stem: bool,
    ):
        super().__init__()
        width = stage_channels[0]
        if imagenet_stem:
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        # Identity keeps module names and the forward the same for both stems.
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if imagenet_stem else nn.Identity()
        for index, (channels, blocks) in enumerate(zip(stage_channels, blocks_per_stage)):
            stride = 1 if index == 0 else 2
            stage = [BasicBlock(width, channels, stride)]
            stage += [BasicBlock(channels, channels) for _ in range(blocks - 1)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
            width = channels
        self.num_stages = len(stage_channels)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialization: He-normal convs, BN as identity.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for index in range(self.num_stages):  # a Python constant: unrolled by torch.fx
            x = getattr(self, f"layer{index + 1}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """CIFAR ResNet-20 (He et al. 2016): 3 stages x 3 BasicBlocks, 16/32/64 channels, 32x32 inputs.

    Args:
        num_classes: outputs of the classifier.
        in_channels: input image channels.
    Returns:
        An untrained ResNet (0.27 M parameters, about 41 M MACs at 32x32).
    """
    return ResNet((16, 32, 64), (3, 3, 3), num_classes, in_channels, imagenet_stem=False)


def resnet18(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    """ImageNet ResNet-18: 7x7/2 stem + max-pool, 4 stages x 2 BasicBlocks, 64..512 channels, 224x224 inputs.

    Args:
        num_classes: outputs of the classifier.
        in_channels: input image channels.
    Returns:
        An untrained ResNet (11.7 M parameters, about 1.8 G MACs at 224x224), for benchmarking.
    """
    return ResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes, in_channels, imagenet_stem=True)


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-18 with a 3x3/1 stem and no max-pool, for 32x32 inputs (the common CIFAR variant).

    Args:
        num_classes: outputs of the classifier.
        in_channels: input image channels.
    Returns:
        An untrained ResNet (11.2 M parameters, about 0.56 G MACs at 32x32).
    """
    return ResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes, in_channels, imagenet_stem=False)
