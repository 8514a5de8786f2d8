"""Which PyTorch module an onnxruntime node belongs to: the attribution behind the layer profiler.

Nodes of the *optimized* graph are traced back to the module that produced them in two steps:

1. optimized node -> exported ONNX node. Fusions rename nodes: a fused Conv+Relu keeps the Conv's name
   (``FusedConv``), while the NCHWc layout pass names a conv after the tensor it now produces plus
   ``_nchwc`` (``/layer1/relu/Relu_output_0_nchwc``); that tensor's producer is followed back through
   element-wise ops (Relu, Add, BatchNormalization, ...) to the Conv/Gemm/MatMul that was fused.
   Layout reorders that onnxruntime inserts (``ReorderInput``/``ReorderOutput``) are charged to the
   neighbour that runs in the plain layout, the node that made the conversion necessary.
2. exported ONNX node -> module scopes: a Conv/Gemm whose weight is named after its parameter
   (``layer1.0.conv1.weight``) belongs to that module; otherwise the dynamo exporter's
   ``pkg.torch.onnx.name_scopes`` metadata, or the TorchScript scope in the node name
   (``/layer1/layer1.0/conv1/Conv``).
"""

from __future__ import annotations

import ast
from collections import defaultdict

import onnx

__all__ = ["source_scopes", "optimized_node_scopes", "REORDER_OPS"]

REORDER_OPS = ("ReorderInput", "ReorderOutput")



_COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "QLinearConv")



# Ops onnxruntime fuses into a preceding conv/gemm; followed backwards to find the fused layer.
_FUSIBLE_OPS = ("Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Tanh", "Elu", "Selu",
                "Softplus", "BatchNormalization", "Add", "Sum", "Mul", "Div", "Sub", "Identity")



def source_scopes(node: onnx.NodeProto, module_names: set[str] | None = None,
                  initializer_names: set[str] | None = None) -> tuple[str, ...]:
    """Qualified module names an exported ONNX node came from, outermost first.

    Sources, most reliable first: the weight of a Conv/Gemm/MatMul when it is an initializer named
    after its parameter (``layer1.0.conv1.weight``; exporter fusions such as Conv+BatchNorm keep it but
    give the node the BatchNorm's metadata); the dynamo exporter's ``pkg.torch.onnx.name_scopes``;
    a TorchScript-style node name.

    Args:
        node: a node of a graph written by torch.onnx.
        module_names: the model's ``named_modules()`` names; when given, only those count as scopes.
        initializer_names: the graph's initializer names, to recognize parameter-named weights.
    Returns:
        e.g. ``("layer1", "layer1.0", "layer1.0.conv1")``; empty for ops of the top-level forward.
    """
    owner = _weight_owner(node, module_names, initializer_names or set())
    if owner is not None:
        parts = owner.split(".")
        return tuple(".".join(parts[: i + 1]) for i in range(len(parts)))
    metadata = {entry.key: entry.value for entry in node.metadata_props}
    scopes: list[str] | None = None
    raw = metadata.get("pkg.torch.onnx.name_scopes")
    if raw:
        try:
            parsed = ast.literal_eval(raw)
            # The last entry names the op (``conv2d_1``), the others the enclosing modules.
            scopes = [s for s in parsed[:-1] if isinstance(s, str) and s]
        except (ValueError, SyntaxError):
            scopes = None
    if scopes is None:
        scopes = _torchscript_scopes(node.name)
    if module_names is not None:
        scopes = [s for s in scopes if s in module_names]
    return tuple(scopes)



def _weight_owner(node: onnx.NodeProto, module_names: set[str] | None, initializers: set[str]) -> str | None:
    """``layer1.0.conv1`` for a Conv/Gemm/MatMul whose weight initializer is ``layer1.0.conv1.weight``."""
    if node.op_type not in _COMPUTE_OPS or len(node.input) < 2:
        return None
    weight = node.input[1]
    if weight not in initializers or not weight.endswith(".weight"):
        return None
    owner = weight[: -len(".weight")]
    if not owner or (module_names is not None and owner not in module_names):
        return None
    return owner



def _torchscript_scopes(name: str) -> list[str]:
    """``/layer1/layer1.0/conv1/Conv`` -> ``[layer1, layer1.0, layer1.0.conv1]``.

    Each path part is the child's attribute name, except that children of containers are written
    ``<container attribute>.<index>`` (``layer1.0``, ``seq.1``), i.e. prefixed by the previous part.
    """
    if not name.startswith("/"):
        return []
    parts = [p for p in name.split("/")[1:-1] if p]
    scopes: list[str] = []
    previous_part, previous_scope = "", ""
    for part in parts:
        if previous_part and part.startswith(previous_part + "."):
            scope = previous_scope + part[len(previous_part):]
        else:
            scope = f"{previous_scope}.{part}" if previous_scope else part
        scopes.append(scope)
        previous_part, previous_scope = part, scope
    return scopes



def optimized_node_scopes(source: onnx.ModelProto, optimized: onnx.ModelProto,
                           module_names: set[str] | None) -> dict[str, tuple[str, ...]]:
    """Scopes of each optimized-graph node, through the exported node it derives from."""
    graph = _SourceGraph(source)
    scopes: dict[str, tuple[str, ...]] = {}
    reorders = []
    for node in optimized.graph.node:
        if node.op_type in REORDER_OPS:
            reorders.append(node)
            continue
        origin = graph.origin_of(node)
        if origin is not None:
            scopes[node.name] = source_scopes(origin, module_names, graph.initializers)
    # A reorder exists because a node next to it runs in the plain layout: charge that node.
    producers = {out: n for n in optimized.graph.node for out in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in optimized.graph.node:
        for name in n.input:
            consumers[name].append(n)
    for node in reorders:
        upstream = [producers[name] for name in node.input[:1] if name in producers]
        downstream = [c for name in node.output for c in consumers.get(name, [])]
        # ReorderOutput (NCHWc -> NCHW) feeds a plain consumer; ReorderInput is fed by a plain producer.
        neighbours = downstream + upstream if node.op_type == "ReorderOutput" else upstream + downstream
        for neighbour in neighbours:
            if scopes.get(neighbour.name):
                scopes[node.name] = scopes[neighbour.name]
                break
    return scopes



class _SourceGraph:
    """The exported graph, indexed to trace optimized nodes back to exported ones."""

    def __init__(self, model: onnx.ModelProto):
        self.nodes = {n.name: n for n in model.graph.node if n.name}
        self.producer = {out: n for n in model.graph.node for out in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in model.graph.node:
            for name in n.input:
                self.consumers[name].append(n)
        self.initializers = {t.name for t in model.graph.initializer}
        self.constants = set(self.initializers)
        self.constants |= {out for n in model.graph.node if n.op_type == "Constant" for out in n.output}

    def origin_of(self, node: onnx.NodeProto) -> onnx.NodeProto | None:
        """The exported node an optimized node stands for (the conv, for a conv with fused activations)."""
        if node.name in self.nodes:
            return self.nodes[node.name]  # unchanged, or fused under the first node's name (FusedConv)
        base = node.name.removesuffix("_nchwc")
        if base in self.nodes:
            return self.nodes[base]
        if base in self.producer:  # NCHWc nodes are named after the tensor they produce
            return self._fused_origin(self.producer[base])
        for name in node.output:
            if name in self.producer:
                return self._fused_origin(self.producer[name])
        prefixed = [n for n in self.nodes if node.name.startswith(n) and node.name[len(n):][:1] in ("/", "_")]
        if prefixed:  # fusions that name the new node after the old one plus a suffix
            return self.nodes[max(prefixed, key=len)]
        for name in node.input:  # surviving initializers, e.g. a conv's bias
            if name in self.constants:
                users = [c for c in self.consumers.get(name, []) if c.op_type in _COMPUTE_OPS]
                if len(users) == 1:
                    return users[0]
        return None

    def _fused_origin(self, node: onnx.NodeProto) -> onnx.NodeProto:
        """Follow element-wise ops back to the conv/gemm they were fused into (or stop where unclear)."""
        current = node
        for _ in range(16):  # fused chains are short; the bound guards against odd graphs
            if current.op_type in _COMPUTE_OPS or current.op_type not in _FUSIBLE_OPS:
                break
            candidates = [self.producer[name] for name in current.input
                          if name in self.producer and name not in self.constants]
            if len(candidates) > 1:
                # A residual Add: the branch fused into it is the conv whose only consumer is the Add.
                candidates = [c for c in candidates
                              if c.op_type in _COMPUTE_OPS + _FUSIBLE_OPS and len(self._users(c)) == 1]
            if len(candidates) != 1:
                break
            current = candidates[0]
        return current if current.op_type in _COMPUTE_OPS else node

    def _users(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        return [c for name in node.output for c in self.consumers.get(name, [])]
