"""Small, fast stand-ins for the real pretrained networks of ``benchmarks/real_models.py``.

The real networks are optional extras (their weights ship in other packages); these stand-ins keep
their layer shapes and the way they reach convfactor, at tiny channel counts:

  * CREPE: 1-D audio convs written as Conv2d with (512, 1) / (64, 1) kernels, stride (4, 1),
    asymmetric F.pad, BatchNorm after ReLU, and ``forward(x, embed=False)``;
  * an onnx2torch-style GraphModule (PP-OCR brought in from ONNX): modules named ``p2o/Conv/0``,
    constants as attributes, and an elementwise module whose Python ``if`` on a tensor property
    defeats re-tracing; depthwise, pointwise and 1x3 convs.

Runs without the optional packages (the onnx2torch round trip is skipped when it is missing).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import fx, nn

import convfactor
from benchmarks.real.crepe import CENTS_OFFSET, CENTS_PER_BIN, Crepe, pitch_metrics
from benchmarks.real.uniform import fraction_for_macs, uniform_policy

torch.set_num_threads(1)
WIDTHS = [16, 8, 8, 8, 8, 16]


def crepe_standin() -> Crepe:
    torch.manual_seed(0)
    model = Crepe(widths=WIDTHS)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def frames(count: int, seed: int) -> torch.Tensor:
    """Normalised frames of harmonic tones: correlated inputs, as real audio is."""
    rng = np.random.default_rng(seed)
    t = np.arange(1024) / 16000
    f0 = rng.uniform(80, 800, size=(count, 1))
    x = np.sin(2 * np.pi * f0 * t) + 0.5 * np.sin(4 * np.pi * f0 * t + 1) + 0.05 * rng.standard_normal((count, 1024))
    x = torch.tensor(x, dtype=torch.float32)
    return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_crepe_standin_has_crepe_layer_shapes():
    model = crepe_standin()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(512, 1)] + [(64, 1)] * 5
    assert [c.stride for c in convs] == [(4, 1)] + [(1, 1)] * 5
    with torch.no_grad():
        out = model(frames(3, 0))
    assert out.shape == (3, 360)


def test_crepe_standin_full_rank_exact_through_capture():
    model = crepe_standin()
    x = frames(4, 1)
    with torch.no_grad():
        ref = model(x)
    fast = convfactor.factorize(model, "spatial_svd", x[:1], concrete_args={"embed": False})
    with torch.no_grad():
        assert rel_err(fast(x), ref) <= 1e-5
        assert rel_err(model(x), ref) == 0.0  # the caller's model is untouched
    report = convfactor.get_report(fast)
    assert sum(1 for layer in report.layers if layer.method == "spatial_svd") == 6


def test_crepe_standin_keeps_call_signature():
    """``embed`` is a plain bool with a default: captured without concrete_args, still accepted."""
    model = crepe_standin()
    x = frames(2, 5)
    fast = convfactor.factorize(model, "spatial_svd", x[:1])
    with torch.no_grad():
        ref = model(x)
        assert rel_err(fast(x), ref) <= 1e-5
        assert rel_err(fast(x, embed=False), ref) <= 1e-5
    with pytest.raises(Exception, match="embed"):
        fast(x, embed=True)


def test_crepe_standin_auto_macs_with_calibration():
    model = crepe_standin()
    cal, probe = frames(16, 2), frames(8, 3)
    fast = convfactor.factorize(model, {"target": {"macs": 0.5}, "rules": [{"match": "*", "method": "auto"}]},
                                cal[:1], concrete_args={"embed": False}, calibration=cal)
    report = convfactor.get_report(fast)
    assert report.macs_after <= 0.5 * report.macs_before * 1.01
    with torch.no_grad():
        err = rel_err(fast(probe), model(probe))
    assert np.isfinite(err) and err < 1.0


def test_uniform_fraction_search_matches_factorize():
    model = crepe_standin()
    x = frames(1, 4)
    fraction, predicted = fraction_for_macs(model, (x,), "spatial_svd", 0.5)
    assert predicted <= 0.5
    fast = convfactor.factorize(model, uniform_policy("spatial_svd", fraction), x, concrete_args={"embed": False})
    report = convfactor.get_report(fast)
    assert report.macs_after / report.macs_before == pytest.approx(predicted, rel=1e-9)
    # the next representable step up would exceed the target: the search is not trivially low
    _, above = fraction_for_macs(model, (x,), "spatial_svd", 0.6)
    assert above > predicted


def test_crepe_pitch_decoding():
    bins = np.arange(360)
    target_bin = 123.3
    activation = np.exp(-0.5 * ((bins - target_bin) / 1.5) ** 2)[None, :]
    cents = CENTS_OFFSET + CENTS_PER_BIN * target_bin
    f0 = 10 * 2 ** (cents / 1200)
    result = pitch_metrics(activation, np.array([f0]))
    assert result["rpa50"] == 1.0
    assert result["median_cents"] < 2.0
    off = pitch_metrics(activation, np.array([f0 * 2 ** (100 / 1200)]))  # a semitone away
    assert off["rpa50"] == 0.0 and off["median_cents"] == pytest.approx(100, abs=2)


# ---- an onnx2torch-style GraphModule ---------------------------------------------------------

class OnnxBinaryMathOperation(nn.Module):
    """Like onnx2torch's: integer vs float division decided by a Python ``if`` on the inputs."""

    def __init__(self, op: str):
        super().__init__()
        self.op = op

    def forward(self, first, second):
        if self.op == "Div":
            if first.is_floating_point() or second.is_floating_point():
                return torch.div(first, second)
            return torch.div(first, second, rounding_mode="trunc")
        return torch.add(first, second) if self.op == "Add" else torch.mul(first, second)


def onnx_style_graphmodule() -> fx.GraphModule:
    torch.manual_seed(0)
    modules = {
        "p2o/Conv/0": nn.Conv2d(3, 16, 3, stride=2, padding=1),
        "p2o/Div/0": OnnxBinaryMathOperation("Div"),
        "p2o/Conv/1": nn.Conv2d(16, 16, 3, padding=1, groups=16),
        "p2o/Conv/2": nn.Conv2d(16, 32, 1),
        "p2o/Add/0": OnnxBinaryMathOperation("Add"),
        "p2o/Conv/3": nn.Conv2d(32, 24, (1, 3), padding=(0, 1)),
        "p2o/Relu/0": nn.ReLU(),
    }
    root = nn.Module()
    for name, module in modules.items():
        root.add_module(name, module)
    root.register_buffer("initializers_0", torch.tensor(2.0))
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_module("p2o/Conv/0", (x,))
    y = graph.call_module("p2o/Div/0", (y, graph.get_attr("initializers_0")))
    y = graph.call_module("p2o/Conv/1", (y,))
    y = graph.call_module("p2o/Conv/2", (y,))
    y = graph.call_module("p2o/Relu/0", (graph.call_module("p2o/Add/0", (y, y)),))
    graph.output(graph.call_module("p2o/Conv/3", (y,)))
    return fx.GraphModule(root, graph).eval()


def test_onnx_style_graphmodule_full_rank_and_export(tmp_path):
    gm = onnx_style_graphmodule()
    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        ref = gm(x)
    fast = convfactor.factorize(gm, "spatial_svd", x[:1])  # re-tracing fails; its own graph is used
    with torch.no_grad():
        assert rel_err(fast(x), ref) <= 1e-5
        assert rel_err(gm(x), ref) == 0.0
    methods = {layer.name: layer.method for layer in convfactor.get_report(fast).layers}
    assert methods["p2o/Conv/0"] == "spatial_svd" and methods["p2o/Conv/3"] == "spatial_svd"
    assert methods["p2o/Conv/1"] != "spatial_svd"  # depthwise: skipped with a reason
    # the result exports with the TorchScript exporter and runs the same in onnxruntime
    import onnxruntime as ort

    path = tmp_path / "fast.onnx"
    convfactor.export_onnx(fast, x[:1], path, exporter="torchscript")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x[:1].numpy()})[0]
    assert rel_err(torch.from_numpy(got), ref[:1]) <= 1e-5


def test_onnx2torch_round_trip(tmp_path):
    import importlib.util

    if importlib.util.find_spec("onnx2torch") is None:
        pytest.skip("onnx2torch is not installed (optional extra 'real')")
    from benchmarks.real.onnx_import import onnx_to_torch

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Hardswish(),
                        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 24, 1)).eval()
    x = torch.randn(1, 3, 16, 24)
    path = tmp_path / "net.onnx"
    convfactor.export_onnx(net, x, path, exporter="torchscript")
    gm = onnx_to_torch(str(path), (1, 3, 16, 24))
    with torch.no_grad():
        ref = net(x)
        assert rel_err(gm(x), ref) <= 1e-5
    fast = convfactor.factorize(gm, "spatial_svd", x, trace=False)
    with torch.no_grad():
        assert rel_err(fast(x), ref) <= 1e-5
