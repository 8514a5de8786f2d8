"""What a quantized ONNX graph holds, read from the graph itself: quantized nodes, float ones, bits.

Pure functions over an ``onnx.ModelProto`` (weights need not be loaded). Two formats are recognised:

  * QDQ (``quantize_static``): a compute node is quantized when its data input comes from a
    ``DequantizeLinear``; its weight is an integer initializer behind a ``DequantizeLinear``.
  * integer ops (``quantize_dynamic``): ``ConvInteger``, ``MatMulInteger`` and the ``com.microsoft``
    ``DynamicQuantize*`` fusions take integer inputs directly.

The bits are what the challenge score needs (``convfactor.score.bits_from_onnx``): the weight bits are
the parameter-weighted mean width of the stored weight tensors (an int8 tensor counts 8, a float one 32,
an int32 bias 32; scales and zero points are quantization metadata and not counted); the activation
bits are the widest activation that any compute node reads (one float Conv makes them 32).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnx

__all__ = ["COMPUTE_OPS", "INTEGER_OPS", "GraphBits", "quantized_nodes", "float_compute_nodes", "graph_bits"]

# The ops whose cost the score's MAC term counts, in float form.
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Ops that compute on integers themselves (dynamic quantization, or QOperator format).
INTEGER_OPS = ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeMatMul",
               "MatMulIntegerToFloat", "QGemm", "DynamicQuantizeLSTM")

_BITS = {
    onnx.TensorProto.FLOAT: 32, onnx.TensorProto.DOUBLE: 64, onnx.TensorProto.FLOAT16: 16,
    onnx.TensorProto.BFLOAT16: 16, onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT8: 8,
    onnx.TensorProto.INT16: 16, onnx.TensorProto.UINT16: 16, onnx.TensorProto.INT32: 32,
    onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4,
}


@dataclass(frozen=True)
class GraphBits:
    """Bits read from a graph.

    Attributes:
        weight_bits: parameter-weighted mean bits of the stored weight tensors.
        activation_bits: the widest activation read by a compute node (8 when all are quantized).
        weight_params: parameter count per bit width (``{8: 270000, 32: 650}``).
    """

    weight_bits: float
    activation_bits: int
    weight_params: dict[int, int]

    def to_dict(self) -> dict:
        return {"weight_bits": self.weight_bits, "activation_bits": self.activation_bits,
                "weight_params": {str(k): v for k, v in sorted(self.weight_params.items())}}


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in graph.node for output in node.output}


def _op(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def quantized_nodes(model: onnx.ModelProto) -> dict[str, int]:
    """Quantized compute nodes per op type: QDQ-wrapped float ops (data input from a DequantizeLinear)
    and integer ops. Q/DQ nodes themselves are counted under their own names, for the record."""
    graph = model.graph
    made_by = _producers(graph)
    counts: Counter[str] = Counter()
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"):
            counts[node.op_type] += 1
        elif node.op_type in INTEGER_OPS:
            counts[_op(node)] += 1
        elif node.op_type in COMPUTE_OPS and node.input:
            producer = made_by.get(node.input[0])
            if producer is not None and producer.op_type == "DequantizeLinear":
                counts[_op(node)] += 1
    return dict(sorted(counts.items()))


def float_compute_nodes(model: onnx.ModelProto) -> dict[str, int]:
    """Compute nodes (``COMPUTE_OPS``) that still run in float: neither wrapped in Q/DQ nor integer."""
    graph = model.graph
    made_by = _producers(graph)
    counts: Counter[str] = Counter()
    for node in graph.node:
        if node.op_type not in COMPUTE_OPS or not node.input:
            continue
        producer = made_by.get(node.input[0])
        if producer is None or producer.op_type != "DequantizeLinear":
            counts[_op(node)] += 1
    return dict(sorted(counts.items()))


def graph_bits(model: onnx.ModelProto) -> GraphBits:
    """Weight and activation bits of the graph (see the module docstring for what counts)."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    made_by = _producers(graph)
    metadata = set()  # scales and zero points of Q/DQ nodes
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            metadata.update(node.input[1:])
    weights: Counter[int] = Counter()
    for name, tensor in initializers.items():
        if name in metadata or tensor.data_type == onnx.TensorProto.INT64:
            continue  # quantization metadata, shapes and indices
        count = 1
        for dim in tensor.dims:
            count *= dim
        if count > 1:  # scalars are constants of the graph, not weights
            weights[_BITS.get(tensor.data_type, 32)] += count
    total = sum(weights.values())
    weight_bits = sum(bits * n for bits, n in weights.items()) / total if total else 32.0
    return GraphBits(round(weight_bits, 3), _activation_bits(graph, made_by, initializers), dict(weights))


def _activation_bits(graph: onnx.GraphProto, made_by: dict[str, onnx.NodeProto],
                     initializers: dict[str, onnx.TensorProto]) -> int:
    """The widest activation a compute node reads: 8 behind a DequantizeLinear or in an integer op."""
    widest = 0
    for node in graph.node:
        if node.op_type in INTEGER_OPS:
            widest = max(widest, 8)
        elif node.op_type in COMPUTE_OPS and node.input:
            producer = made_by.get(node.input[0])
            quantized = producer is not None and producer.op_type == "DequantizeLinear"
            widest = max(widest, 8 if quantized else 32)
    return widest or 32
