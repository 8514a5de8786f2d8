"""Whole-model latency timing exports with the configured exporter and falls back to the other one."""

import pytest
import torch
from torch import nn

import convfactor
from convfactor.auto.latency.model import LatencyOptions, compare_models, time_model
from convfactor.errors import ConvfactorError
from convfactor.runtime import export as onnx_export
from convfactor.runtime import exporters, sessions


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x, embed: bool = False):
        y = self.head(torch.relu(self.conv(x)))
        return y if embed else y.mean(dim=(2, 3))


FAST = {"cache": False, "verify_min_time": 0.02}


def test_whole_model_timing_of_a_factorized_model_with_a_traced_flag():
    # It crashed: the TorchScript exporter fed embed=False as a tensor to torch.fx's `embed == False` check.
    model = Flagged().eval()
    x = torch.randn(1, 3, 8, 8)
    fast = convfactor.factorize(model, "tucker2:0.5", x)
    assert time_model(fast, (x,), LatencyOptions(**FAST)) > 0


def test_timing_falls_back_to_dynamo_when_torchscript_fails(monkeypatch):
    used = []
    export_one = exporters._export_one

    def recording(spec, staged, exporter):
        used.append(exporter)
        return export_one(spec, staged, exporter)

    def failing(spec, staged):
        raise RuntimeError("We don't have an op for aten::eq but it isn't a special case.\nArgument types: Tensor, bool")

    monkeypatch.setattr(exporters, "_export_one", recording)
    monkeypatch.setattr(exporters, "_export_torchscript", failing)
    model = Flagged().eval()
    x = torch.randn(1, 3, 8, 8)
    options = LatencyOptions(**FAST)
    assert options.exporter == "torchscript"
    assert time_model(model, (x,), options) > 0
    assert used == ["torchscript", "dynamo"]


def test_comparison_asks_for_the_same_fallback(monkeypatch):
    orders = []
    export_onnx = onnx_export.export_onnx

    def recording(model, inputs, path, *, exporter, **kwargs):
        orders.append(exporter)
        return export_onnx(model, inputs, path, exporter="torchscript", **kwargs)

    monkeypatch.setattr(sessions, "export_onnx", recording)  # prepare_onnx exports with it
    model = Flagged().eval()
    assert compare_models(model, model, (torch.randn(1, 3, 8, 8),), LatencyOptions(**FAST)) > 0
    assert orders == [("torchscript", "dynamo")] * 2


def test_unknown_exporter_is_a_clear_error():
    with pytest.raises(ConvfactorError, match="latency: unknown exporter 'onnx'"):
        LatencyOptions.from_any({"exporter": "onnx"})
