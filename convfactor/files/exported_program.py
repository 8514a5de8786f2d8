"""Lifting a ``torch.export`` program back into modules, so it factorizes like an eager model.

A program's ``module()`` has no Conv/Linear modules: parameters are read by ``aten.conv2d``/``aten.linear``
calls. ``lift_exported_module`` turns those calls back into ``nn.Conv1d``/``nn.Conv2d``/``nn.Linear``/
``nn.BatchNorm`` modules with the original names. Left as functional calls, hence not factorized: a weight
read at several call sites (shared), or owned by a module that holds other tensors. The program's input
guards are dropped, so other batch sizes run wherever the graph allows.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

__all__ = ["lift_exported_module"]


_ATEN = torch.ops.aten



_CONV_TARGETS = {
    _ATEN.conv1d.default: 1, _ATEN.conv2d.default: 2,
    _ATEN.conv1d.padding: 1, _ATEN.conv2d.padding: 2,
}



def lift_exported_module(program: Any) -> torch.fx.GraphModule:
    """An eager-style GraphModule from a torch.export program: aten layer calls become layer modules.

    ``ExportedProgram.module()`` reads every parameter with ``get_attr`` and calls
    ``aten.conv2d(x, weight, bias, stride, padding, dilation, groups)``; convfactor works on
    ``nn.Conv2d`` modules. Each such call whose weight (and bias) are owned by a module holding nothing
    else becomes a ``call_module`` of a real ``nn.Conv1d``/``nn.Conv2d``/``nn.Linear`` at the owner's
    name (``layer1.0.conv1``), sharing the same tensors; eval-mode ``aten.batch_norm`` likewise becomes
    ``nn.BatchNorm1d/2d`` so it can be folded. State_dict keys stay those of the original model.

    Args:
        program: an ``ExportedProgram`` (or the GraphModule its ``module()`` returns).
    Returns:
        The GraphModule, numerically identical to the program.
    """
    graph_module = program.module() if hasattr(program, "module") and not isinstance(program, nn.Module) \
        else program
    graph = graph_module.graph
    for node in list(graph.nodes):
        # The input guards pin the exported example shapes (batch 1, say); dropping them lets the
        # lifted model run other batch sizes wherever the graph itself allows it.
        if node.op == "call_module" and str(node.target) == "_guards_fn" and not node.users:
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _CONV_TARGETS or node.target is _ATEN.linear.default:
            _lift_layer(graph_module, node)
        elif node.target is _ATEN.batch_norm.default:
            _lift_batchnorm(graph_module, node)
    graph.eliminate_dead_code()
    if _plain_calling_convention(graph):
        # A fresh GraphModule without the pytree in/out specs: it deep-copies and re-traces quietly.
        graph_module = torch.fx.GraphModule(graph_module, graph, type(graph_module).__name__)
    graph.lint()
    graph_module.recompile()
    return graph_module



def _plain_calling_convention(graph: torch.fx.Graph) -> bool:
    """Switch an exported graph to plain ``forward(*tensors) -> tensor(s)`` code when its specs allow it."""
    pytree_info = getattr(graph._codegen, "pytree_info", None)
    if pytree_info is None:
        return False
    in_spec, out_spec = pytree_info.in_spec, pytree_info.out_spec
    positional_only = (in_spec is not None and in_spec.type is tuple and in_spec.num_children == 2
                       and in_spec.child(0).type is tuple and all(c.is_leaf() for c in in_spec.child(0).children())
                       and in_spec.child(1).type is dict and in_spec.child(1).num_children == 0)
    if not positional_only or out_spec is None:
        return False
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    results = output.args[0]
    if out_spec.is_leaf() and isinstance(results, (tuple, list)) and len(results) == 1:
        output.args = (results[0],)
    elif not (out_spec.type is tuple and all(c.is_leaf() for c in out_spec.children())):
        return False
    graph._codegen = torch.fx.graph.CodeGen()
    return True



_CONV_DEFAULTS = (("bias", None), ("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))



_BN_ARGS = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")



def _call_args(node: torch.fx.Node, names: Sequence[str], defaults: Mapping[str, Any]) -> dict[str, Any]:
    values = dict(defaults)
    values.update(zip(names, node.args))
    values.update({k: v for k, v in node.kwargs.items() if k in names})
    return values



def _owner(graph_module: torch.fx.GraphModule, node: Any, attribute: str) -> str | None:
    """The owning module's name when ``node`` is ``get_attr owner.attribute`` used by one call only."""
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr" or len(node.users) != 1:
        return None
    owner, _, name = str(node.target).rpartition(".")
    return owner if name == attribute and owner else None



def _owned_tensors(graph_module: torch.fx.GraphModule, owner: str) -> tuple[set, set, bool]:
    module = graph_module.get_submodule(owner)
    params = {n for n, _ in module.named_parameters(recurse=False)}
    buffers = {n for n, _ in module.named_buffers(recurse=False)}
    return params, buffers, any(True for _ in module.children())



def _replace_with_module(graph_module: torch.fx.GraphModule, node: torch.fx.Node, owner: str,
                         module: nn.Module, input_node: Any) -> None:
    parent, _, name = owner.rpartition(".")
    setattr(graph_module.get_submodule(parent) if parent else graph_module, name, module)
    with graph_module.graph.inserting_before(node):
        call = graph_module.graph.call_module(owner, (input_node,))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    graph_module.graph.erase_node(node)



def _lift_layer(graph_module: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    linear = node.target is _ATEN.linear.default
    names = ("input", "weight", "bias") if linear else ("input", "weight") + tuple(n for n, _ in _CONV_DEFAULTS)
    args = _call_args(node, names, dict(_CONV_DEFAULTS))
    owner = _owner(graph_module, args["weight"], "weight")
    if owner is None:
        return
    if args["bias"] is not None and _owner(graph_module, args["bias"], "bias") != owner:
        return
    params, buffers, has_children = _owned_tensors(graph_module, owner)
    if has_children or buffers or params != ({"weight", "bias"} if args["bias"] is not None else {"weight"}):
        return  # the owner is more than a plain layer: leave the functional call as it is
    weight = operator.attrgetter(str(args["weight"].target))(graph_module)
    bias = None if args["bias"] is None else operator.attrgetter(str(args["bias"].target))(graph_module)
    if linear:
        if weight.dim() != 2:
            return
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    else:
        dims = _CONV_TARGETS[node.target]
        if weight.dim() != dims + 2:
            return
        groups = int(args["groups"])
        padding = args["padding"] if isinstance(args["padding"], str) else _per_axis(args["padding"], dims)
        layer = (nn.Conv1d if dims == 1 else nn.Conv2d)(
            weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
            stride=_per_axis(args["stride"], dims), padding=padding, dilation=_per_axis(args["dilation"], dims),
            groups=groups, bias=bias is not None, device="meta",
        )
    layer.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
    weight_node, bias_node = args["weight"], args["bias"]
    _replace_with_module(graph_module, node, owner, layer, args["input"])
    for attr_node in (weight_node, bias_node):
        if isinstance(attr_node, torch.fx.Node) and not attr_node.users:
            graph_module.graph.erase_node(attr_node)



def _per_axis(value: Any, dims: int) -> tuple[int, ...]:
    values = [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
    return tuple(values * dims) if len(values) == 1 else tuple(values)



def _lift_batchnorm(graph_module: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    args = _call_args(node, _BN_ARGS, {})
    if args.get("training") is not False or "running_var" not in args:
        return
    owner = _owner(graph_module, args["running_mean"], "running_mean")
    if owner is None or _owner(graph_module, args["running_var"], "running_var") != owner:
        return
    for key in ("weight", "bias"):
        if args[key] is not None and _owner(graph_module, args[key], key) != owner:
            return
    affine = args["weight"] is not None and args["bias"] is not None
    if not affine and (args["weight"] is not None or args["bias"] is not None):
        return
    params, buffers, has_children = _owned_tensors(graph_module, owner)
    if has_children or params != ({"weight", "bias"} if affine else set()) or \
            not {"running_mean", "running_var"} <= buffers <= {"running_mean", "running_var", "num_batches_tracked"}:
        return
    value = node.meta.get("val")
    rank = value.dim() if isinstance(value, torch.Tensor) else None
    if rank not in (2, 3, 4):
        return
    old = graph_module.get_submodule(owner)
    bn_cls = nn.BatchNorm2d if rank == 4 else nn.BatchNorm1d
    mean = old.running_mean
    layer = bn_cls(mean.shape[0], eps=float(args["eps"]), momentum=float(args["momentum"]), affine=affine,
                   device="meta")
    for name in sorted(params | buffers):
        tensor = getattr(old, name)
        if name in params:
            setattr(layer, name, tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor))
        else:
            layer.register_buffer(name, tensor)
    if "num_batches_tracked" not in buffers:
        layer.num_batches_tracked = None
    layer.eval()
    attr_nodes = [args[k] for k in ("weight", "bias", "running_mean", "running_var")]
    _replace_with_module(graph_module, node, owner, layer, args["input"])
    for attr_node in attr_nodes:
        if isinstance(attr_node, torch.fx.Node) and not attr_node.users:
            graph_module.graph.erase_node(attr_node)
    # num_batches_tracked may be read by a get_attr that nothing uses; dead code elimination keeps get_attr
    for other in list(graph_module.graph.nodes):
        if other.op == "get_attr" and str(other.target) == f"{owner}.num_batches_tracked" and not other.users:
            graph_module.graph.erase_node(other)
