"""Bring an ONNX model into PyTorch with onnx2torch, without torchvision.

onnx2torch imports ``torchvision`` at module level for two converters (NonMaxSuppression and
RoiAlign) that none of our models use. torchvision does not import beside this repository's torch,
so when it is missing a placeholder module stands in; calling it raises.
"""
from __future__ import annotations

import importlib.util
import sys
import types


def _torchvision_placeholder() -> None:
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return

    def unavailable(*args, **kwargs):
        raise RuntimeError("torchvision is not installed; this ONNX op needs it")

    tv = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    ops.nms = ops.roi_align = ops.box_convert = unavailable
    tv.ops = ops
    sys.modules["torchvision"] = tv
    sys.modules["torchvision.ops"] = ops


def onnx_to_torch(path: str, input_shape=None):
    """The ONNX model at ``path`` as a torch.fx GraphModule (onnx2torch), in eval mode.

    ``input_shape`` fixes the first input's dimensions (None entries stay symbolic) so that shape
    inference can tell onnx2torch each BatchNormalization's rank.
    """
    import onnx

    _torchvision_placeholder()
    from onnx2torch import convert

    model = constants_to_initializers(onnx.load(path))
    if input_shape is not None:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        for dim, size in zip(dims, input_shape):
            if size is not None:
                dim.Clear()
                dim.dim_value = int(size)
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    if input_shape is not None and None not in input_shape:
        _measured_batchnorm_shapes(model, input_shape)
    return convert(model).eval()


def _measured_batchnorm_shapes(model, input_shape) -> None:
    """Fill the shapes shape inference left unknown at BatchNormalization inputs by running the
    model once in onnxruntime (a Reshape fed by Shape arithmetic defeats static inference)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper

    known = {v.name: v for v in model.graph.value_info}
    missing = [n.input[0] for n in model.graph.node if n.op_type == "BatchNormalization"
               and not (n.input[0] in known and known[n.input[0]].type.tensor_type.shape.dim)]
    if not missing:
        return
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in missing:
        probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.zeros(input_shape, dtype=np.float32)
    values = session.run(missing, {model.graph.input[0].name: x})
    for name, value in zip(missing, values):
        if name in known:
            model.graph.value_info.remove(known[name])
        model.graph.value_info.append(
            helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(value.shape)))


def constants_to_initializers(model):
    """Move tensor-valued ``Constant`` nodes into the graph's initializers.

    Paddle2ONNX exports (PP-OCR) hold conv weights in Constant nodes; onnx2torch's Conv converter
    reads weights from initializers only.
    """
    from onnx import numpy_helper

    graph = model.graph
    keep = []
    for node in graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Constant" and "value" in attrs and len(node.output) == 1:
            array = numpy_helper.to_array(attrs["value"].t)
            graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return model


def package_file(package: str, *parts: str) -> str:
    """Path of a data file inside an installed package, found without importing the package."""
    import os

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: package {package!r} is not installed (pip install '.[real]')")
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found in package {package!r}")
    return path
