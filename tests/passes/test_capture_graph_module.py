"""capture: GraphModules made by ONNX converters are rewritten with their own graph, and export to ONNX."""

import importlib
import importlib.util
import sys
import types

import numpy as np
import onnx
import pytest
import torch
import torch.fx
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import convfactor
from convfactor.runtime.export import export_onnx
from convfactor.runtime.sessions import make_session


class BinaryMath(nn.Module):
    """Like onnx2torch's OnnxBinaryMathOperation: Python branches on tensor properties and values."""

    def forward(self, first, second):
        if first.is_floating_point() and not (second == 0).any():
            return torch.div(first, second)
        return torch.div(first, second, rounding_mode="trunc")


def converted_like() -> torch.fx.GraphModule:
    """A GraphModule built node by node, as converters do: conv -> div -> relu -> conv -> bn."""
    root = nn.Module()
    root.conv = nn.Conv2d(3, 8, 3, padding=1)
    root.div = BinaryMath()
    root.conv2 = nn.Conv2d(8, 6, 3, padding=1)
    root.bn = nn.BatchNorm2d(6)
    root.register_buffer("two", torch.tensor(2.0))
    with torch.no_grad():
        root.bn.running_mean.uniform_(-1, 1)
        root.bn.running_var.uniform_(0.5, 2)
    graph = torch.fx.Graph()
    x = graph.placeholder("input_1")
    y = graph.call_module("conv", (x,))
    y = graph.call_module("div", (y, graph.get_attr("two")))
    y = graph.call_function(torch.relu, (y,))
    y = graph.call_module("bn", (graph.call_module("conv2", (y,)),))
    graph.output(y)
    return torch.fx.GraphModule(root, graph).eval()


def test_graph_module_that_cannot_be_traced_again_is_rewritten_with_its_own_graph(tmp_path):
    torch.manual_seed(0)
    model = converted_like()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(converted_like())  # re-tracing fails in BinaryMath
    x = torch.randn(2, 3, 8, 8)
    fast = convfactor.factorize(model, "tucker2", x)  # full rank: the same function
    report = convfactor.get_report(fast)
    assert {d.name for d in report.replaced} == {"conv", "conv2"}
    assert report.folded == [["conv2", "bn"]]
    assert any("its own graph" in note for note in report.notes)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    # An argument its forward does not have is a user mistake, named before any work (it was a note once).
    with pytest.raises(convfactor.ConvfactorError, match="concrete_args: 'scale' is not an argument"):
        convfactor.factorize(model, "tucker2", x, concrete_args={"scale": 2.0})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # the caller's model is kept

    result = export_onnx(fast, x, tmp_path / "fast.onnx")
    assert result.exporter == "torchscript" and "dynamo export failed" in result.fallback_reason
    session = make_session(result.path, threads=1)
    (got,) = session.run(None, {result.input_names[0]: x.numpy()})
    np.testing.assert_allclose(got, fast(x).detach().numpy(), rtol=1e-4, atol=1e-5)


# -- onnx2torch, when installed ---------------------------------------------------------------------


@pytest.fixture
def onnx2torch(monkeypatch):
    """onnx2torch imports torchvision at import time, only for its NMS and RoIAlign converters; when
    torchvision is missing (or cannot load with this torch) a stub stands in, and those two ops fail."""
    if importlib.util.find_spec("onnx2torch") is None:
        pytest.skip("onnx2torch is not installed (pip install convfactor[onnx])")
    try:
        import torchvision.ops  # noqa: F401
    except Exception:
        def unavailable(*args, **kwargs):
            raise RuntimeError("torchvision is not available")

        vision, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
        ops.nms = ops.roi_align = ops.batched_nms = unavailable
        vision.ops = ops
        monkeypatch.setitem(sys.modules, "torchvision", vision)
        monkeypatch.setitem(sys.modules, "torchvision.ops", ops)
    return importlib.import_module("onnx2torch")


def small_onnx_net(seed: int = 0) -> onnx.ModelProto:
    """Conv -> Div (by a constant) -> Relu -> Conv -> BatchNormalization, as an exporter writes it."""
    rng = np.random.default_rng(seed)

    def init(name, *shape, scale=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    initializers = [
        init("w1", 8, 3, 3, 3), init("b1", 8), numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        init("w2", 6, 8, 3, 3), init("b2", 6),
        init("gamma", 6), init("beta", 6), init("mean", 6),
        numpy_helper.from_array(rng.uniform(0.5, 2, 6).astype(np.float32), "var"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="p2o.Conv.0"),
        helper.make_node("Div", ["c1", "two"], ["d1"], name="p2o.Div.0"),
        helper.make_node("Relu", ["d1"], ["r1"], name="p2o.Relu.0"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="p2o.Conv.1"),
        helper.make_node("BatchNormalization", ["c2", "gamma", "beta", "mean", "var"], ["y"], name="p2o.BN.0"),
    ]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8, 8])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def test_onnx2torch_graph_module_is_factorized_and_exports(onnx2torch, tmp_path):
    proto = small_onnx_net()
    model = onnx2torch.convert(proto).eval()
    x = torch.randn(1, 3, 8, 8)
    fast = convfactor.factorize(model, "tucker2", x)  # traced by default; falls back to the own graph
    report = convfactor.get_report(fast)
    assert len(report.replaced) == 2 and report.capture == "fx"
    assert any("its own graph" in note for note in report.notes)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    result = export_onnx(fast, x, tmp_path / "fast.onnx")
    session = make_session(result.path, threads=1)
    (got,) = session.run(None, {result.input_names[0]: x.numpy()})
    (expected,) = make_session_from_proto(proto, tmp_path).run(None, {"x": x.numpy()})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)  # the factorized export computes the original


def make_session_from_proto(proto: onnx.ModelProto, directory):
    path = directory / "original.onnx"
    onnx.save(proto, str(path))
    return make_session(path, threads=1)
