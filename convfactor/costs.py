"""Parameter and MAC counts, per layer and per model.

N_macs(conv) = H_out * W_out * k_h * k_w * (C_in / groups) * C_out per sample. A factorized module is counted
by running it once and summing its stages, so the same code counts the original and every method.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["layer_macs", "count_params", "count_zeros", "module_macs", "per_layer_macs"]


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
