"""export_onnx: every method's output exports to standard ONNX that matches PyTorch, written atomically."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from convfactor.errors import ConvfactorError, ExportError
from convfactor.files.atomic import OutputExistsError
from convfactor.methods import available_methods, get_method
from convfactor.runtime import exporters
from convfactor.runtime.export import export_onnx
from convfactor.runtime.onnx_graph import conv_nodes, nonstandard_ops, onnx_node_counts

# (layer factory, input shape): small, and covering stride per axis, groups, 1-d, 1x1 and Linear.
LAYERS = {
    "conv3x3": (lambda: nn.Conv2d(8, 16, 3, padding=1), (2, 8, 8, 8)),
    "conv_stride21_groups2": (lambda: nn.Conv2d(8, 16, 3, stride=(2, 1), padding=(1, 0), groups=2), (2, 8, 9, 7)),
    "conv1d": (lambda: nn.Conv1d(8, 16, 3, padding=1), (2, 8, 12)),
    "pointwise": (lambda: nn.Conv2d(16, 16, 1), (2, 16, 5, 5)),
    "linear": (lambda: nn.Linear(16, 12), (2, 16)),
}
FLOAT32_RTOL = 1e-5


def _factorized_model(method_name: str, layer_name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    make_layer, shape = LAYERS[layer_name]
    layer = make_layer()
    method = get_method(method_name)
    reason = method.unsupported_reason(layer)
    if reason:
        pytest.skip(f"{method_name} does not apply to {layer_name}: {reason}")
    # Full rank: exact and fast for every method (CP's ALS at lower ranks takes seconds).
    factorized = method.decompose(layer, method.resolve_rank(layer))
    return nn.Sequential(factorized, nn.ReLU()).eval(), torch.randn(shape)


def _run_onnx(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    return float(np.linalg.norm(reference - candidate) / np.linalg.norm(reference))


def _check_export(tmp_path, model: nn.Module, x: torch.Tensor, exporter: str) -> None:
    result = export_onnx(model, x, tmp_path / "m.onnx", exporter=exporter)

    assert result.exporter == exporter and result.fallback_reason is None
    onnx.checker.check_model(str(result.path), full_check=True)
    proto = onnx.load(str(result.path))
    assert nonstandard_ops(proto) == []

    with torch.no_grad():
        expected = model(x).numpy()
    assert _relative_error(expected, _run_onnx(result.path, x)) <= FLOAT32_RTOL

    # Every conv stage is one ONNX Conv with the same weight shape and `group` (depthwise stages too).
    torch_convs = sorted((m.groups, tuple(m.weight.shape)) for m in model.modules()
                         if isinstance(m, (nn.Conv1d, nn.Conv2d)))
    onnx_convs = sorted((c.group, c.weight_shape) for c in conv_nodes(proto))
    assert onnx_convs == torch_convs
    assert result.node_counts.get("Conv", 0) == len(torch_convs)


@pytest.mark.parametrize("layer_name", list(LAYERS))
@pytest.mark.parametrize("method_name", available_methods())
def test_each_method_exports_standard_onnx_matching_pytorch(tmp_path, method_name, layer_name):
    model, x = _factorized_model(method_name, layer_name)
    _check_export(tmp_path, model, x, "torchscript")


class _EveryMethod(nn.Module):
    """Each method's factorization of one test layer, side by side on the same input."""

    def __init__(self, branches: dict[str, nn.Module]):
        super().__init__()
        self.branches = nn.ModuleDict(branches)

    def forward(self, x):
        return tuple(branch(x) for branch in self.branches.values())


def test_every_method_exports_with_dynamo(tmp_path):
    # One model holding every method keeps this to one dynamo export (about a second each).
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 8)
    branches = {}
    for name in available_methods():
        method = get_method(name)
        layer = next((make() for make in (LAYERS["conv3x3"][0], lambda: nn.Conv2d(8, 16, 1))
                      if method.unsupported_reason(make()) is None), None)
        if layer is not None:
            branches[name] = nn.Sequential(method.decompose(layer, method.resolve_rank(layer)), nn.ReLU())
    assert branches, "no method applies to a 3x3 or 1x1 conv"
    model = _EveryMethod(branches).eval()
    result = export_onnx(model, x, tmp_path / "m.onnx", exporter="dynamo")

    assert result.exporter == "dynamo"
    # One self-contained file: torch would write the weights to m.onnx.data; no staging left either.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"] and result.external_data_path is None
    assert result.output_shapes[0][0] == "batch"
    onnx.checker.check_model(str(result.path), full_check=True)
    assert nonstandard_ops(result.path) == []
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    exported = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
    for name, reference, candidate in zip(branches, expected, exported):
        assert _relative_error(reference.numpy(), candidate) <= FLOAT32_RTOL, name
    torch_convs = sorted((m.groups, tuple(m.weight.shape)) for m in model.modules()
                         if isinstance(m, (nn.Conv1d, nn.Conv2d)))
    assert sorted((c.group, c.weight_shape) for c in conv_nodes(result.path)) == torch_convs


def test_depthwise_stage_exports_as_grouped_conv(tmp_path):
    depthwise = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 1)).eval()
    result = export_onnx(depthwise, torch.randn(1, 8, 6, 6), tmp_path / "dw.onnx", exporter="torchscript")
    assert [(c.group, c.kernel_shape) for c in conv_nodes(result.path)] == [(8, (3, 3)), (1, (1, 1))]


def test_result_describes_the_file(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    result = export_onnx(model, torch.randn(1, 3, 6, 6), tmp_path / "m.onnx", exporter="torchscript")
    assert result.path.stat().st_size == result.file_size > 0
    assert result.external_data_path is None
    assert result.opset >= 13
    assert result.input_names == ("input",) and result.output_names == ("output",)
    assert result.output_shapes == (("batch", 5),)
    assert result.dynamic_batch and result.notes == ()
    assert result.node_counts == onnx_node_counts(result.path)
    assert result.node_counts["Conv"] == 1 and result.node_counts["Gemm"] == 1
    json.dumps(result.to_dict())
    assert "m.onnx" in str(result)


def test_dynamic_batch_runs_any_batch_size(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()
    result = export_onnx(model, torch.randn(1, 3, 5, 5), tmp_path / "m.onnx", exporter="torchscript")
    for batch in (1, 3):
        x = torch.randn(batch, 3, 5, 5)
        with torch.no_grad():
            assert _relative_error(model(x).numpy(), _run_onnx(result.path, x)) <= FLOAT32_RTOL
    static = export_onnx(model, torch.randn(1, 3, 5, 5), tmp_path / "s.onnx", exporter="torchscript",
                         dynamic_batch=False)
    assert static.output_shapes == ((1, 4, 5, 5),)


class _FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 3 * 3, 2)

    def forward(self, x):
        return self.fc(self.conv(x).view(1, -1))  # a literal batch size: only batch 1 fits fc


def test_a_batch_the_exporter_had_to_fix_is_reported(tmp_path):
    result = export_onnx(_FixedBatch(), torch.randn(1, 3, 5, 5), tmp_path / "m.onnx", exporter="dynamo")
    assert not result.dynamic_batch
    assert len(result.notes) == 1 and "batch" in result.notes[0]


def test_external_data_on_request(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU()).eval()
    x = torch.randn(1, 3, 6, 6)
    result = export_onnx(model, x, tmp_path / "m.onnx", exporter="torchscript", external_data=True)
    assert result.external_data_path == tmp_path / "m.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert result.file_size == (tmp_path / "m.onnx").stat().st_size + (tmp_path / "m.onnx.data").stat().st_size
    onnx.checker.check_model(str(result.path), full_check=True)
    with torch.no_grad():
        assert _relative_error(model(x).numpy(), _run_onnx(result.path, x)) <= FLOAT32_RTOL


def test_export_does_not_change_the_model(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model.train()
    model[1].eval()  # a mixed state must come back exactly as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, torch.randn(2, 3, 6, 6), tmp_path / "m.onnx", exporter="torchscript")
    assert [m.training for m in model.modules()] == [True, True, False, True]
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_existing_file_is_kept_without_force(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"keep me")
    model = nn.Conv2d(3, 4, 3)
    with pytest.raises(OutputExistsError) as info:
        export_onnx(model, torch.randn(1, 3, 5, 5), target, exporter="torchscript")
    assert isinstance(info.value, ConvfactorError) and "\n" not in str(info.value)
    assert target.read_bytes() == b"keep me"
    result = export_onnx(model, torch.randn(1, 3, 5, 5), target, exporter="torchscript", force=True)
    onnx.checker.check_model(str(result.path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


class _DataDependent(nn.Module):
    """Branches on a tensor value: torch.export cannot capture it, TorchScript tracing can."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            return y
        return -y


def test_auto_falls_back_to_torchscript_and_says_why(tmp_path):
    x = torch.randn(1, 3, 5, 5)
    result = export_onnx(_DataDependent(), x, tmp_path / "m.onnx", exporter="auto")
    assert result.exporter == "torchscript"
    assert result.fallback_reason and "\n" not in result.fallback_reason
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_explicit_exporter_does_not_fall_back(tmp_path, monkeypatch):
    def failing_dynamo(spec, staged):
        raise RuntimeError("cannot capture\nmore detail")

    monkeypatch.setattr(exporters, "_export_dynamo", failing_dynamo)
    with pytest.raises(ExportError, match="dynamo export failed: RuntimeError: cannot capture$"):
        export_onnx(nn.Conv2d(3, 4, 3), torch.randn(1, 3, 5, 5), tmp_path / "m.onnx", exporter="dynamo")
    assert list(tmp_path.iterdir()) == []


class _Broken(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom\nsecond line")


def test_failures_are_one_line_export_errors_and_leave_nothing(tmp_path):
    with pytest.raises(ExportError) as info:
        export_onnx(_Broken(), torch.randn(1, 3), tmp_path / "m.onnx", exporter="torchscript")
    assert "boom" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ExportError, match="unknown exporter"):
        export_onnx(nn.Linear(3, 3), torch.randn(1, 3), tmp_path / "m.onnx", exporter="fast")
    with pytest.raises(ConvfactorError, match="tensors"):
        export_onnx(nn.Linear(3, 3), [1, 2, 3], tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


class _Printing(nn.Module):
    """Like a failed dynamo attempt on a real network: prints a lot from Python and from native code."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        if torch.compiler.is_exporting():  # only in the dynamo attempt, which then fails
            print("graph line\n" * 500)
            os.write(1, b"native line\n" * 500)
            os.write(2, b"native error\n" * 500)
        if y.sum() > 0:
            return y
        return -y


def test_fallback_is_quiet_with_one_line_saying_why(tmp_path, capfd, caplog):
    x = torch.randn(1, 3, 5, 5)
    with caplog.at_level("WARNING", logger="convfactor.runtime.exporters"):
        result = export_onnx(_Printing(), x, tmp_path / "m.onnx", exporter="auto")
    out, err = capfd.readouterr()
    assert result.exporter == "torchscript"
    assert len((out + err).splitlines()) <= 1, (out + err)[:500]
    warnings = [r.getMessage() for r in caplog.records if r.name == "convfactor.runtime.exporters"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "dynamo export failed" in warnings[0] and "torchscript" in warnings[0]
    assert result.fallback_reason in warnings[0] and "\x1b[" not in result.fallback_reason


def test_exporter_order_tries_torchscript_first_then_dynamo(tmp_path, monkeypatch):
    assert exporters.exporter_order("torchscript") == ("torchscript", "dynamo")
    assert exporters.exporter_order("auto") == exporters.exporter_order("dynamo") == ("dynamo", "torchscript")
    with pytest.raises(ExportError, match="unknown exporter"):
        exporters.exporter_order("fast")
    with pytest.raises(ExportError, match="distinct names"):
        export_onnx(nn.Conv2d(3, 4, 3), torch.randn(1, 3, 5, 5), tmp_path / "m.onnx",
                    exporter=("torchscript", "torchscript"))

    def failing_torchscript(spec, staged):
        raise RuntimeError("We don't have an op for aten::eq\nArgument types: Tensor, bool")

    monkeypatch.setattr(exporters, "_export_torchscript", failing_torchscript)
    model, x = nn.Conv2d(3, 4, 3), torch.randn(1, 3, 5, 5)
    result = export_onnx(model, x, tmp_path / "m.onnx", exporter=("torchscript", "dynamo"))
    assert result.exporter == "dynamo"
    assert result.fallback_reason == "torchscript export failed: RuntimeError: We don't have an op for aten::eq"
    np.testing.assert_allclose(_run_onnx(result.path, x), model(x).detach().numpy(), rtol=1e-5, atol=1e-6)


class _Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x, embed: bool = False, mode: str = "mean"):
        y = self.conv(x)
        if embed:
            return y
        return y.mean(dim=(2, 3)) if mode == "mean" else y.amax(dim=(2, 3))


def test_torchscript_export_ignores_non_tensor_arguments_with_defaults(tmp_path):
    # The TorchScript exporter fed every default as a traced input: embed=False became a tensor (plain
    # torch.fx concrete args then failed with "no op for aten::eq ... Tensor, bool"), mode="mean" failed.
    model = _Flagged().eval()
    x = torch.randn(2, 3, 6, 6)
    traced = torch.fx.symbolic_trace(model, concrete_args={"embed": False, "mode": "mean"})
    for name, candidate in (("module", model), ("fx", traced)):
        result = export_onnx(candidate, x, tmp_path / f"{name}.onnx", exporter="torchscript")
        assert result.input_names == ("x",)
        np.testing.assert_allclose(_run_onnx(result.path, x), model(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    assert "forward" not in vars(model) and "forward" not in vars(traced)  # nothing left behind
