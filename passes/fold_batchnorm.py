"""BatchNorm folding: conv -> BatchNorm (eval statistics) becomes one conv with a bias.

    y = gamma * (W*x + b - mean) / sqrt(var + eps) + beta
      = (s * W) * x + (s * (b - mean) + beta),   s = gamma / sqrt(var + eps)

Folding first means the factorization sees the weights the network really applies, and the factorized
model has no BatchNorm left to re-tune. Valid for inference (eval mode) only: the folded layer uses the
running statistics.
"""

from __future__ import annotations

import copy

import torch
import torch.fx
from torch import nn

from .manager import PassResult
from .modules import set_submodule

__all__ = ["fold_batchnorm", "fold_batchnorm_into"]

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# Exact types on purpose: a subclass (a quantized or LoRA conv, say) may change what forward computes.
_FOLDABLE = {nn.Conv1d: "Conv1d", nn.Conv2d: "Conv2d", nn.Linear: "Linear"}


@torch.no_grad()
def fold_batchnorm_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A copy of ``layer`` (Conv1d/Conv2d/Linear) with ``bn``'s eval-mode affine map folded in (float64 math)."""
    fused = copy.deepcopy(layer)
    w = layer.weight.detach().to(torch.float64)
    scale = (bn.running_var.detach().to(torch.float64) + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(torch.float64)
    shift = -bn.running_mean.detach().to(torch.float64)
    if layer.bias is not None:
        shift = shift + layer.bias.detach().to(torch.float64)
    bias = shift * scale
    if bn.bias is not None:
        bias = bias + bn.bias.detach().to(torch.float64)
    fused.weight.copy_((w * scale.reshape(-1, *([1] * (w.dim() - 1)))).to(layer.weight))
    if fused.bias is None:
        fused.bias = nn.Parameter(torch.empty(w.shape[0], dtype=layer.weight.dtype, device=layer.weight.device))
    fused.bias.copy_(bias.to(fused.bias))
    return fused


def fold_batchnorm(graph_module: torch.fx.GraphModule) -> PassResult:
    """Fold every BatchNorm whose input is a Conv1d/Conv2d (or a 2-d Linear output) used only by it.

    A layer called at several sites (shared), a BatchNorm without running statistics, and a Linear
    whose output shape is unknown or not (N, C) are left alone. changes = [[layer, batchnorm], ...].
    """
    modules = dict(graph_module.named_modules())
    calls: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = []
    for node in list(graph_module.graph.nodes):
        if node.op != "call_module" or type(modules.get(node.target)) not in _BATCHNORMS:
            continue
        bn = modules[node.target]
        producer = node.args[0] if node.args else None
        if not (isinstance(producer, torch.fx.Node) and producer.op == "call_module"):
            continue
        layer = modules.get(producer.target)
        kind = _FOLDABLE.get(type(layer))
        if kind is None or len(producer.users) != 1 or calls[producer.target] != 1 or calls[node.target] != 1:
            continue
        if bn.running_mean is None or bn.running_var is None:
            continue
        if kind == "Linear":
            meta = producer.meta.get("tensor_meta")
            if meta is None or len(meta.shape) != 2:
                continue
        set_submodule(graph_module, producer.target, fold_batchnorm_into(layer, bn))
        node.replace_all_uses_with(producer)
        graph_module.graph.erase_node(node)
        folded.append([producer.target, node.target])
    if folded:
        graph_module.delete_all_unused_submodules()
        graph_module.recompile()
    return PassResult(graph_module, bool(folded), folded, "fold_batchnorm")
