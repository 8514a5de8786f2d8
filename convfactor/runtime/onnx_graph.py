"""Reading an ONNX graph: node counts per op, non-standard ops, Conv nodes, opset and value shapes.

Every walk includes the subgraphs of If/Loop/Scan nodes.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import onnx

from ..errors import ExportError

__all__ = ["STANDARD_DOMAINS", "ConvNode", "onnx_node_counts", "nonstandard_ops", "conv_nodes", "op_key",
           "all_initializers", "default_opset", "value_shape"]

STANDARD_DOMAINS = ("", "ai.onnx")



def _all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from _all_graphs(sub)



def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for sub in _all_graphs(graph):
        yield from sub.node



def all_initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    for sub in _all_graphs(graph):
        yield from sub.initializer



def _as_model(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(str(model), load_external_data=False)



def op_key(node: onnx.NodeProto) -> str:
    """``Conv`` for the standard domains, ``com.microsoft::FusedConv`` otherwise."""
    return node.op_type if node.domain in STANDARD_DOMAINS else f"{node.domain}::{node.op_type}"



def onnx_node_counts(model: onnx.ModelProto | str | os.PathLike) -> dict[str, int]:
    """Nodes per op type, subgraphs included, most frequent first (``"domain::Op"`` off the standard domain)."""
    counts = Counter(op_key(node) for node in _all_nodes(_as_model(model).graph))
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))



def nonstandard_ops(model: onnx.ModelProto | str | os.PathLike) -> list[str]:
    """``"domain::Op"`` of every node outside the standard ONNX domain (sorted, unique); empty is good."""
    return sorted({op_key(node) for node in _all_nodes(_as_model(model).graph)
                   if node.domain not in STANDARD_DOMAINS})



@dataclass(frozen=True)
class ConvNode:
    """One ONNX ``Conv`` node: its name, ``group``, kernel, and weight shape when known."""

    name: str
    group: int
    kernel_shape: tuple[int, ...]
    weight_shape: tuple[int, ...] | None = field(default=None)



def conv_nodes(model: onnx.ModelProto | str | os.PathLike) -> list[ConvNode]:
    """Every standard-domain ``Conv`` node with its ``group`` and kernel shape, in graph order."""
    proto = _as_model(model)
    shapes = {t.name: tuple(t.dims) for t in all_initializers(proto.graph)}
    result = []
    for node in _all_nodes(proto.graph):
        if node.op_type != "Conv" or node.domain not in STANDARD_DOMAINS:
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weight_shape = shapes.get(node.input[1]) if len(node.input) > 1 else None
        kernel = attributes.get("kernel_shape")
        if kernel is None and weight_shape is not None:
            kernel = weight_shape[2:]
        result.append(ConvNode(node.name, int(attributes.get("group", 1)), tuple(kernel or ()), weight_shape))
    return result



def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in STANDARD_DOMAINS:
            return int(entry.version)
    raise ExportError("the exported model declares no default-domain opset")



def value_shape(value: onnx.ValueInfoProto) -> tuple[int | str | None, ...]:
    dims = value.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims)
