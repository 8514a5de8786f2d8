"""Shape annotation: run example inputs through the model so each layer knows its input and output size.

On a GraphModule, torch.fx's ShapeProp also stores ``tensor_meta`` on every node. Forward hooks record
the shapes of every Conv/Linear layer, including those inside leaf modules the graph does not see into.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .manager import PassResult

__all__ = ["annotate_shapes", "layer_io_shapes"]

LayerShapes = dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def layer_io_shapes(root: nn.Module, example_inputs: Sequence[torch.Tensor]) -> LayerShapes:
    """{layer name: (input shape, output shape)} of every Conv/Linear in ``root`` (first call wins).

    Runs ``root`` once (ShapeProp for a GraphModule, so nodes get ``tensor_meta`` too).
    """
    shapes: LayerShapes = {}
    handles = []
    for name, module in root.named_modules():
        if isinstance(module, _LAYERS):
            def hook(mod, args, out, name=name):
                if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                    shapes.setdefault(name, (tuple(args[0].shape), tuple(out.shape)))
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            if isinstance(root, torch.fx.GraphModule):
                ShapeProp(root).propagate(*example_inputs)
            else:
                root(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def annotate_shapes(graph_module: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> PassResult:
    """Store ``tensor_meta`` on every node; ``changes[0]`` is the layer shape table."""
    return PassResult(graph_module, False, [layer_io_shapes(graph_module, example_inputs)], "annotate_shapes")
