"""What a factorization needs to know about a layer, normalized once.

``LayerGeometry`` turns a Conv1d/Conv2d/Linear into plain tuples (kernel, stride, padding, dilation)
so that every method reads the same facts, including the awkward ones: ``padding='same'``/``'valid'``,
per-axis strides such as ``(2, 1)``, ``groups`` and ``padding_mode``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

__all__ = ["LayerGeometry", "layer_kind", "SUPPORTED_KINDS"]

SUPPORTED_KINDS = ("Conv1d", "Conv2d", "Linear")


def layer_kind(module: nn.Module) -> str | None:
    """'Conv1d', 'Conv2d' or 'Linear' for the layer types convfactor rewrites, else None.

    Exact type checks on purpose: a subclass (a quantized or LoRA conv, say) may change ``forward``
    and would be rewritten wrongly.
    """
    for kind, cls in (("Conv1d", nn.Conv1d), ("Conv2d", nn.Conv2d), ("Linear", nn.Linear)):
        if type(module) is cls:
            return kind
    return None


@dataclass(frozen=True)
class LayerGeometry:
    """Normalized description of a Conv1d, Conv2d or Linear layer.

    A Linear layer is described as a 1-d "conv" with kernel (1,) so that the same rank arithmetic
    applies; ``kind`` tells them apart.
    """

    kind: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str  # ints per axis, or 'same'
    dilation: tuple[int, ...]
    groups: int
    bias: bool
    padding_mode: str

    @classmethod
    def of(cls, layer: nn.Module) -> LayerGeometry:
        kind = layer_kind(layer)
        if kind is None:
            raise TypeError(f"convfactor rewrites Conv1d, Conv2d and Linear, not {type(layer).__name__}")
        if kind == "Linear":
            return cls(kind, layer.in_features, layer.out_features, (1,), (1,), (0,), (1,), 1,
                       layer.bias is not None, "zeros")
        dims = len(layer.kernel_size)
        padding = layer.padding
        if padding == "valid":
            padding = (0,) * dims
        elif padding != "same":
            padding = tuple(int(p) for p in padding)
        return cls(
            kind=kind,
            in_channels=layer.in_channels,
            out_channels=layer.out_channels,
            kernel=tuple(layer.kernel_size),
            stride=tuple(layer.stride),
            padding=padding,
            dilation=tuple(layer.dilation),
            groups=layer.groups,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
        )

    @property
    def dims(self) -> int:
        return len(self.kernel)

    @property
    def kernel_volume(self) -> int:
        return math.prod(self.kernel)

    @property
    def is_pointwise(self) -> bool:
        """A Linear layer or a conv whose kernel is all ones."""
        return self.kind == "Linear" or self.kernel_volume == 1

    @property
    def is_depthwise(self) -> bool:
        """Every input channel has its own filters: nothing to factorize across channels."""
        return self.kind != "Linear" and self.groups == self.in_channels and self.in_channels > 1

    def axis_padding(self, axis: int) -> int | str:
        """Padding of one spatial axis: an int, or 'same' (which PyTorch resolves per axis)."""
        return "same" if self.padding == "same" else self.padding[axis]
