"""int8 quantization with onnxruntime: the QDQ graph, its error against float, the dynamic fallback, the bits
read from the graph, and ``convert --quantize int8`` (outputs published as one set, the bound keeping float).

Inputs are the shipped digits images (real data, not noise), on a small conv net with seeded weights.
"""

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import convfactor
from convfactor.runtime.quantized_graph import float_compute_nodes, graph_bits, quantized_nodes
from convfactor.score import bits_from_onnx
from convfactor.zoo.digits import load_digits_split
from tests.cli_models import TinyNet, randomized

ARCH = "tests.cli_models:tiny_net"
SHAPE = "1,3,32,32"
# int8 per-channel weights and uint8 activations on this 4-layer net: the logits' relative L2 error
# measured 0.02 on held-out digits; 0.06 leaves room for other CPUs' rounding, not for a broken graph.
INT8_REL_L2 = 0.06


@pytest.fixture(scope="module")
def digits():
    x, _ = load_digits_split("test")
    return x[:64], x[64:128]  # calibration, held-out


@pytest.fixture(scope="module")
def float_onnx(tmp_path_factory, digits):
    path = tmp_path_factory.mktemp("float") / "net.onnx"
    convfactor.export_onnx(randomized(TinyNet()), digits[0][:1], path, exporter="torchscript")
    return path


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def test_static_qdq_graph_checks_and_stays_close_to_float(tmp_path, float_onnx, digits):
    calibration, held_out = digits
    result = convfactor.runtime.quantize_onnx(float_onnx, tmp_path / "net.int8.onnx", calibration)
    graph = onnx.load(str(result.path))
    onnx.checker.check_model(graph, full_check=True)
    assert result.mode == "static" and result.format == "QDQ" and result.calibration_samples == 64
    assert quantized_nodes(graph)["Conv"] == 3 and quantized_nodes(graph)["Gemm"] == 1  # BN folded by pre-processing
    assert result.quantized_compute == 4 and float_compute_nodes(graph) == {}
    assert result.quantized_nodes["QuantizeLinear"] > 0 and result.quantized_nodes["DequantizeLinear"] > 0
    weights = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(weights) == 3  # the conv weights are stored as int8
    assert result.activation_type == "uint8"
    assert all("reduce_range" in note for note in result.notes)  # the only note: 7-bit weights on a CPU without VNNI
    assert _rel_l2(_run(float_onnx, held_out), _run(result.path, held_out)) < INT8_REL_L2


def test_relative_paths_are_quantized_static(tmp_path, float_onnx, digits, monkeypatch):
    """The calibrator runs in a scratch directory: relative input and output paths still name the caller's files."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.onnx").write_bytes(float_onnx.read_bytes())
    result = convfactor.runtime.quantize_onnx("net.onnx", "net.int8.onnx", digits[0])
    assert result.mode == "static" and (tmp_path / "net.int8.onnx").is_file()
    assert _rel_l2(_run(float_onnx, digits[1]), _run(tmp_path / "net.int8.onnx", digits[1])) < INT8_REL_L2


def test_module_is_exported_then_quantized_and_keep_float(tmp_path, digits):
    calibration, _ = digits
    result = convfactor.runtime.quantize_onnx(randomized(TinyNet()), tmp_path / "m.int8.onnx", calibration,
                                      keep_float=["Gemm", "no_such_node"], calibrate_method="percentile",
                                      exporter="torchscript")
    assert result.float_compute_nodes == {"Gemm": 1} and result.quantized_compute == 3
    assert len(result.kept_float) == 1 and result.calibrate_method == "percentile"
    assert any("no_such_node" in note for note in result.notes)
    assert graph_bits(onnx.load(str(result.path))).activation_bits == 32  # the float Gemm reads float
    assert sorted(os.listdir(tmp_path)) == ["m.int8.onnx"]  # no staging or calibration files left


def test_without_calibration_dynamic_quantization_says_so(tmp_path, float_onnx, digits):
    result = convfactor.runtime.quantize_onnx(float_onnx, tmp_path / "dyn.onnx")
    assert result.mode == "dynamic" and result.calibrate_method is None and result.calibration_samples == 0
    assert any("dynamic quantization" in note and "no calibration data" in note for note in result.notes)
    assert result.quantized_nodes.get("ConvInteger") == 3
    onnx.checker.check_model(str(result.path))
    held_out = digits[1]
    assert _rel_l2(_run(float_onnx, held_out), _run(result.path, held_out)) < INT8_REL_L2


class _BatchNormAfterRelu(torch.nn.Module):
    """conv -> ReLU -> BatchNorm, as in CREPE: no pre-processing can fold that BatchNorm into a conv."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Conv2d(8, 4, 3, stride=2)

    def forward(self, x):
        return self.head(self.bn(torch.relu(self.conv(x)))).mean(dim=(2, 3))


class _LayerNormOverChannels(torch.nn.Module):
    """conv -> LayerNorm over the channels (channels last) -> conv, as in a transformer neck."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Conv2d(8, 4, 3, stride=2)

    def forward(self, x):
        x = self.norm(torch.relu(self.conv(x)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(x).mean(dim=(2, 3))


@pytest.mark.parametrize(("net", "op_type"), [(_BatchNormAfterRelu, "BatchNormalization"),
                                              (_LayerNormOverChannels, "LayerNormalization")])
def test_unfoldable_norm_scale_is_per_channel_without_axis_warnings(tmp_path, digits, caplog, net, op_type):
    calibration, held_out = digits
    model = randomized(net())
    source = tmp_path / "bn.onnx"
    convfactor.export_onnx(model, calibration[:1], source, exporter="torchscript")
    with caplog.at_level("WARNING"):
        result = convfactor.runtime.quantize_onnx(source, tmp_path / "bn.int8.onnx", calibration)
    # onnxruntime asked for axis 1 of the (C,) scale and logged "Axis 1 is out-of-range" per normalization
    assert not [r.getMessage() for r in caplog.records if "out-of-range" in r.getMessage()]
    graph = onnx.load(str(result.path))
    norm = next(node for node in graph.graph.node if node.op_type == op_type)
    producers = {out: node for node in graph.graph.node for out in node.output}
    dequantize = producers[norm.input[1]]
    assert dequantize.op_type == "DequantizeLinear"
    assert next(a.i for a in dequantize.attribute if a.name == "axis") in (0, -1)  # the scale's only axis
    scales = {t.name: t for t in graph.graph.initializer}
    assert list(scales[dequantize.input[1]].dims) == [8]  # one scale per channel, not one per tensor
    assert _rel_l2(_run(source, held_out), _run(result.path, held_out)) < INT8_REL_L2


@pytest.mark.parametrize(("flags", "reduced"), [
    ("fpu sse2 avx avx2", True),                       # x86 without VNNI: u8s8 sums saturate int16
    ("fpu sse2 avx2 avx512f avx512_vnni", False),
    ("fpu sse2 avx2 avx_vnni", False),
    ("fp asimd asimddp", False),                       # ARM: dot-product kernels, no saturation
])
def test_reduced_range_only_on_x86_without_vnni(flags, reduced):
    from convfactor.runtime.quantize import needs_reduced_range

    assert needs_reduced_range(f"processor\t: 0\nflags\t\t: {flags}\n") is reduced
    assert needs_reduced_range("") is False


def test_refuses_overwrite_and_bad_options(tmp_path, float_onnx, digits):
    target = tmp_path / "q.onnx"
    target.write_text("old")
    with pytest.raises(convfactor.ConvfactorError, match="exists"):
        convfactor.runtime.quantize_onnx(float_onnx, target, digits[0])
    with pytest.raises(convfactor.ConvfactorError, match="calibrate_method"):
        convfactor.runtime.quantize_onnx(float_onnx, tmp_path / "x.onnx", digits[0], calibrate_method="kl")
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["q.onnx"]


def test_score_bits_are_read_from_the_graph(tmp_path, float_onnx, digits):
    assert bits_from_onnx(float_onnx) == {"weight_bits": 32.0, "activation_bits": 32}
    result = convfactor.runtime.quantize_onnx(float_onnx, tmp_path / "q.onnx", digits[0])
    bits = bits_from_onnx(result.path)
    # int8 weights; the int32 biases (a few dozen values) lift the mean a little above 8
    assert 8 < bits["weight_bits"] < 9 and bits["activation_bits"] == 8


# -- the command line -------------------------------------------------------------------------------


@pytest.fixture
def inputs(tmp_path, digits):
    calibration, held_out = digits
    torch.save(calibration, tmp_path / "cal.pt")
    torch.save(held_out[:32], tmp_path / "check.pt")
    return tmp_path / "cal.pt", tmp_path / "check.pt"


def _convert(tmp_path, ckpt, *extra):
    return ["convert", ckpt, "--arch", ARCH, "--input-shape", SHAPE, "--out", tmp_path / "fast.pt",
            "--onnx", tmp_path / "fast.onnx", "--exporter", "torchscript", *extra]


def test_cli_quantize_four_models_and_the_score_from_the_graph(cli, tmp_path, ckpt, inputs):
    calibration, check = inputs
    code, out, err = cli(*_convert(tmp_path, ckpt, "--policy", "tucker2:0.5", "--quantize", "int8", "--calibration",
                                   calibration, "--check", "--check-inputs", check, "--bench", "--threads", "1",
                                   "--warmup", "1", "--repeats", "5", "--min-time", "0.05", "--max-rel-l2", "1",
                                   "--min-cosine", "0", "--min-snr-db", "0", "--min-top1", "0"))
    assert code == 0, err
    made = sorted(set(os.listdir(tmp_path)) - {"net.pt", "cal.pt", "check.pt"})
    assert made == ["fast.int8.onnx", "fast.onnx", "fast.pt", "fast.report.json"]  # no staging left
    report = json.loads((tmp_path / "fast.report.json").read_text())
    section = report["quantize"]
    assert section["result"] == "int8" and report["outputs"]["int8_onnx"] == str(tmp_path / "fast.int8.onnx")
    assert set(section["fidelity"]) == {"original_int8", "factorized", "factorized_int8"}
    assert set(section["latency"][0]["models"]) == {"original", "original_int8", "factorized", "factorized_int8"}
    after_bits = report["summary"]["challenge_score_after_bits"]
    assert after_bits == {**bits_from_onnx(tmp_path / "fast.int8.onnx"), "from": str(tmp_path / "fast.int8.onnx")}
    for label in ("original int8", "factorized int8", "int8 result", "read from"):
        assert label in out


def test_cli_quantize_is_published_with_the_set_and_refuses_overwrite(cli, tmp_path, ckpt, inputs, monkeypatch):
    import convfactor.files.atomic as atomic

    argv = _convert(tmp_path, ckpt, "--policy", "spatial_svd:0.5", "--quantize", "int8", "--calibration",
                    inputs[0], "--quiet")
    real, calls = atomic.publish, []

    def publish(temp, path, force):  # the int8 file's move fails as a full disk would
        calls.append(Path(path).name)
        if Path(path).name == "fast.int8.onnx":
            raise OSError(28, "No space left on device", str(path))
        return real(temp, path, force)

    monkeypatch.setattr(atomic, "publish", publish)
    code, _, err = cli(*argv)
    assert code == 2 and "No space left" in err and calls[:3] == ["fast.pt", "fast.onnx", "fast.int8.onnx"]
    assert sorted(set(os.listdir(tmp_path)) - {"net.pt", "cal.pt", "check.pt"}) == []  # none of the set stays
    monkeypatch.setattr(atomic, "publish", real)
    (tmp_path / "fast.int8.onnx").write_text("old")
    code, _, err = cli(*argv)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error:") and "fast.int8.onnx exists" in err
    assert (tmp_path / "fast.int8.onnx").read_text() == "old" and not (tmp_path / "fast.pt").exists()
    code, _, err = cli(*argv, "--force")
    assert code == 0, err
    assert onnx.load(str(tmp_path / "fast.int8.onnx")).graph.node  # replaced by a real model


def test_cli_int8_breaking_the_bound_keeps_float(cli, tmp_path, inputs):
    # conv2's weight is rank one in every mode: factorized exactly (within the bound), while int8 rounding
    # costs ~1% relative error (measured 0.013), far outside a 0.001 bound
    state = randomized(TinyNet()).state_dict()
    a, b, c, d = (torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in (16, 8, 3, 3))
    state["conv2.weight"] = 0.3 * torch.einsum("o,i,h,w->oihw", a, b, c, d)
    ckpt = tmp_path / "net.pt"
    torch.save(state, ckpt)
    code, out, err = cli(*_convert(tmp_path, ckpt, "--policy", "tucker2:0.5", "--quantize", "int8",
                                   "--calibration", inputs[0], "--max-rel-error", "0.001"))
    assert code == 0, err
    assert "layers replaced  2/4" in out or "layers replaced: 2/4" in out
    assert "accuracy warning: the int8 model breaks the fidelity bound" in err
    assert not (tmp_path / "fast.int8.onnx").exists()
    report = json.loads((tmp_path / "fast.report.json").read_text())
    assert report["quantize"]["result"] == "float" and report["outputs"]["int8_onnx"] is None
    assert not report["quantize"]["bound_check"]["passed"]
    assert "challenge_score_after_bits" not in report["summary"]  # the float model is the result
    assert "float kept" in out


@pytest.mark.parametrize("argv", [("--quantize", "int4"), ("--quantize",)])
def test_cli_bad_quantize_value_is_one_error_line(cli, tmp_path, ckpt, argv):
    code, out, err = cli(*_convert(tmp_path, ckpt, "--policy", "svd", *argv))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error:") and "--quantize" in err
    assert sorted(os.listdir(tmp_path)) == ["net.pt"]


def test_cli_quantize_options_without_quantize_are_refused(cli, tmp_path, ckpt):
    code, _, err = cli(*_convert(tmp_path, ckpt, "--policy", "svd", "--keep-float", "Gemm"))
    assert code == 2 and "only used with --quantize" in err and err.count("\n") == 1


def test_skipped_preprocessing_is_noted_once_not_advised_per_graph(tmp_path, float_onnx, digits, caplog):
    with caplog.at_level("WARNING"):
        result = convfactor.runtime.quantize_onnx(float_onnx, tmp_path / "q.int8.onnx", digits[0][:16],
                                                  preprocess=False)
    assert "pre-processing skipped on request" in result.notes
    assert not [r for r in caplog.records if "pre-processing" in r.getMessage()]
