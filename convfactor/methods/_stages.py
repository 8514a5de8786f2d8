"""Small builders for the plain layers a factorized module is made of, shared by every method."""

from __future__ import annotations

import torch
from torch import nn

from ..geometry import LayerGeometry

__all__ = ["make_conv", "geometry_conv", "pointwise", "axis_conv", "conv_cls", "set_weight"]


def conv_cls(dims: int) -> type[nn.Module]:
    return {1: nn.Conv1d, 2: nn.Conv2d}[dims]


def make_conv(
    dims: int,
    in_channels: int,
    out_channels: int,
    kernel: tuple[int, ...],
    *,
    stride: tuple[int, ...] | None = None,
    padding: tuple[int, ...] | str = 0,
    dilation: tuple[int, ...] | None = None,
    groups: int = 1,
    bias: bool = False,
    padding_mode: str = "zeros",
    like: nn.Module | None = None,
) -> nn.Module:
    """A Conv1d/Conv2d with the given geometry, on the dtype and device of ``like``'s weight."""
    factory = {}
    if like is not None:
        factory = {"dtype": like.weight.dtype, "device": like.weight.device}
    return conv_cls(dims)(
        in_channels,
        out_channels,
        kernel,
        stride=stride or (1,) * dims,
        padding=padding,
        dilation=dilation or (1,) * dims,
        groups=groups,
        bias=bias,
        padding_mode=padding_mode,
        **factory,
    )


def geometry_conv(geometry: LayerGeometry, in_channels: int, out_channels: int, *, groups: int,
                  bias: bool = False, like: nn.Module | None = None) -> nn.Module:
    """A conv with the original layer's kernel, stride, padding, dilation and padding_mode.

    The stage of a factorization that sees the input's spatial neighbourhood keeps the original's
    geometry so that the chain produces the original's output grid (same size, same border handling).
    Only the channel counts, ``groups`` and ``bias`` are the method's own.
    """
    return make_conv(geometry.dims, in_channels, out_channels, geometry.kernel, stride=geometry.stride,
                     padding=geometry.padding, dilation=geometry.dilation, groups=groups, bias=bias,
                     padding_mode=geometry.padding_mode, like=like)


def pointwise(geometry: LayerGeometry, in_channels: int, out_channels: int, *, groups: int = 1,
              bias: bool = False, like: nn.Module | None = None) -> nn.Module:
    """A 1x1 conv (or a Linear when the original is Linear) with no stride or padding."""
    if geometry.kind == "Linear":
        factory = {} if like is None else {"dtype": like.weight.dtype, "device": like.weight.device}
        if groups != 1:
            raise ValueError("a Linear stage cannot be grouped")
        return nn.Linear(in_channels, out_channels, bias=bias, **factory)
    return make_conv(geometry.dims, in_channels, out_channels, (1,) * geometry.dims, groups=groups,
                     bias=bias, like=like)


def axis_conv(geometry: LayerGeometry, axis: int, in_channels: int, out_channels: int, *,
              groups: int = 1, bias: bool = False, like: nn.Module | None = None) -> nn.Module:
    """The original layer's kernel, stride, padding and dilation restricted to one spatial axis.

    For a Conv2d and axis 0 this is a (k_h x 1) conv with stride (s_h, 1), padding (p_h, 0), dilation
    (d_h, 1). Zero padding commutes with the per-pixel channel mixing of the other stages, and
    reflect/replicate/circular padding of a 2-d map is the same as padding each axis in turn, so the
    chain is exact for every padding and padding_mode. 'same' stays 'same': PyTorch resolves it per
    axis, giving each axis exactly the padding the original applied to it.
    """
    dims = geometry.dims
    kernel = tuple(geometry.kernel[a] if a == axis else 1 for a in range(dims))
    stride = tuple(geometry.stride[a] if a == axis else 1 for a in range(dims))
    dilation = tuple(geometry.dilation[a] if a == axis else 1 for a in range(dims))
    if geometry.padding == "same":
        padding: tuple[int, ...] | str = "same"
    else:
        padding = tuple(geometry.padding[a] if a == axis else 0 for a in range(dims))
    return make_conv(dims, in_channels, out_channels, kernel, stride=stride, padding=padding,
                     dilation=dilation, groups=groups, bias=bias, padding_mode=geometry.padding_mode,
                     like=like)


@torch.no_grad()
def set_weight(stage: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Copy float64 factors into a stage, casting to the stage's dtype and device."""
    stage.weight.copy_(weight.reshape(stage.weight.shape).to(stage.weight))
    if bias is not None:
        stage.bias.copy_(bias.to(stage.bias))
