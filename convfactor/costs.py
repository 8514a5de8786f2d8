"""Parameter and MAC counts, per layer and per model.

N_macs(conv) = H_out * W_out * k_h * k_w * (C_in / groups) * C_out per sample. A factorized module is counted
by running it once and summing its stages, so the same code counts the original and every method.
``replacement_costs`` counts a candidate replacement without weights: it is built on PyTorch's ``meta``
device (no memory, no arithmetic) and its stages' output shapes follow from conv arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .methods.base import FactorizationMethod, Rank

__all__ = ["layer_macs", "count_params", "count_zeros", "module_macs", "per_layer_macs", "meta_twin",
           "replacement_costs"]


def layer_macs(layer: nn.Module, output_shape: Sequence[int]) -> int:
    """MACs of one Conv1d/Conv2d/Linear per sample, given its output shape (batch first)."""
    per_sample_out = math.prod(output_shape[1:])
    if isinstance(layer, nn.Linear):
        return per_sample_out * layer.in_features
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        fan_in = (layer.in_channels // layer.groups) * math.prod(layer.kernel_size)
        return per_sample_out * fan_in
    return 0


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_zeros(module: nn.Module) -> int:
    """Parameter entries that are exactly zero (unstructured pruning: p_u = count_zeros / count_params)."""
    return sum(int((p == 0).sum()) for p in module.parameters())


def per_layer_macs(module: nn.Module, example_inputs: Sequence[torch.Tensor]) -> dict[str, int]:
    """MACs per sample of every Conv/Linear leaf inside ``module``, keyed by qualified name.

    Runs ``module`` once on ``example_inputs`` with forward hooks (no grad); the module is not changed.
    """
    macs: dict[str, int] = {}
    handles = []
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            def hook(mod, args, out, name=name):
                macs[name] = macs.get(name, 0) + layer_macs(mod, out.shape)
            handles.append(sub.register_forward_hook(hook))
    try:
        with torch.no_grad():
            module(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    return macs


def module_macs(module: nn.Module, input_shape: Sequence[int]) -> int:
    """Total MACs per sample of ``module`` run on one zero tensor of ``input_shape`` (batch first)."""
    param = next(module.parameters(), None)
    factory = {} if param is None else {"dtype": param.dtype, "device": param.device}
    x = torch.zeros((1, *input_shape[1:]), **factory)
    return sum(per_layer_macs(module, (x,)).values())


def meta_twin(layer: nn.Module) -> nn.Module:
    """A weightless copy of a Conv1d/Conv2d/Linear on the meta device (same geometry and dtype)."""
    factory = {"device": "meta", "dtype": layer.weight.dtype}
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, **factory)
    return type(layer)(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                       padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                       bias=layer.bias is not None, padding_mode=layer.padding_mode, **factory)


def _conv_output_shape(stage: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Output shape of a Conv1d/Conv2d stage (PyTorch's arithmetic; padding_mode does not change it)."""
    spatial = []
    for axis, size in enumerate(shape[2:]):
        k, s, d = stage.kernel_size[axis], stage.stride[axis], stage.dilation[axis]
        if stage.padding == "same":
            spatial.append(size)
            continue
        p = 0 if stage.padding == "valid" else stage.padding[axis]
        spatial.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return (shape[0], stage.out_channels, *spatial)


def _chain_macs(module: nn.Module, input_shape: Sequence[int]) -> int | None:
    """MACs of a Sequential of Conv1d/Conv2d/Linear stages from shape arithmetic; None for anything else."""
    stages = list(module.children()) if isinstance(module, nn.Sequential) else [module]
    shape = (1, *input_shape[1:])
    total = 0
    for stage in stages:
        if type(stage) in (nn.Conv1d, nn.Conv2d) and len(shape) == stage.weight.dim():
            shape = _conv_output_shape(stage, shape)
        elif type(stage) is nn.Linear:
            shape = (*shape[:-1], stage.out_features)
        else:
            return None
        total += layer_macs(stage, shape)
    return total


def replacement_costs(
    method: FactorizationMethod, layer: nn.Module, rank: Rank, input_shape: Sequence[int] | None
) -> tuple[int | None, int]:
    """(MACs per sample, parameters) of ``method`` at ``rank`` replacing ``layer``.

    Args:
        input_shape: the layer's input shape (batch first); None gives MACs None.
    Returns:
        MACs as ``convfactor.costs.per_layer_macs`` counts them (shape arithmetic over the stages of
        a meta-device build, or a meta-device run when a stage is not a plain Conv/Linear), and parameters.
    """
    module = method.build(meta_twin(layer), rank)
    params = count_params(module)
    if input_shape is None:
        return None, params
    macs = _chain_macs(module, input_shape)
    if macs is None:
        x = torch.empty((1, *input_shape[1:]), device="meta", dtype=layer.weight.dtype)
        macs = sum(per_layer_macs(module, (x,)).values())
    return macs, params
