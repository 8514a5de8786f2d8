"""The latency model in int8 (``LatencyOptions(int8=True)``): layer graphs, whole models and the latency
target's whole-model checks (``SpeedMeter``) are timed after ``quantize_onnx``, cached apart from float
times, and only in onnxruntime."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from convfactor.auto.latency.model import LatencyModel
from convfactor.auto.latency.options import LatencyOptions
from convfactor.auto.latency.ort_timing import compare_models_onnxruntime, time_layers_onnxruntime
from convfactor.errors import ConvfactorError
from tests.cli_models import TinyNet, randomized

QUICK = {"max_seconds_per_layer": 0.3, "repeats": 5, "warmup": 1, "verify_min_time": 0.1}


def test_layers_and_models_are_timed_as_int8_graphs(monkeypatch):
    import convfactor.auto.latency.ort_timing as ort_timing

    quantized = []
    real = ort_timing.quantized_for_timing

    def spy(path, inputs, *, preprocess):
        quantized.append((path.name, preprocess))
        return real(path, inputs, preprocess=preprocess)

    monkeypatch.setattr(ort_timing, "quantized_for_timing", spy)
    factor = nn.Sequential(nn.Conv2d(16, 8, (3, 1), padding=(1, 0)), nn.Conv2d(8, 16, (1, 3), padding=(0, 1)))
    times = time_layers_onnxruntime([nn.Conv2d(16, 16, 3, padding=1), factor], (1, 16, 8, 8),
                                    LatencyOptions(int8=True, **QUICK))
    assert len(times) == 2 and all(math.isfinite(t) and t > 0 for t in times)
    assert [p for _, p in quantized] == [False] * 3  # the Identity baseline and both variants, no pre-processing
    model = randomized(TinyNet())
    speedup = compare_models_onnxruntime(model, model, (torch.randn(2, 3, 8, 8),), LatencyOptions(int8=True, **QUICK))
    assert speedup > 0 and quantized[-2:] == [("original.onnx", True), ("candidate.onnx", True)]


@pytest.mark.parametrize("int8", [True, False])
def test_the_latency_targets_whole_model_checks_time_int8_graphs(monkeypatch, int8):
    """The budget search's ``SpeedMeter`` times what the layer times were measured on: with ``int8`` the original
    (quantized once, reused) and every candidate as int8 files; without it, the float export and the module."""
    import onnx

    from convfactor.auto.search.verify import SpeedMeter
    from convfactor.runtime import benchmarking

    timed = []

    def record(original, candidate, inputs, **kwargs):
        def describe(subject):
            if isinstance(subject, nn.Module):
                return "module"
            ops = {node.op_type for node in onnx.load(str(subject)).graph.node}
            return ("int8" if "QuantizeLinear" in ops else "float") + ":" + subject.name
        timed.append((describe(original), describe(candidate)))
        return _Report(4.0)

    monkeypatch.setattr(benchmarking, "benchmark", record)
    model = LatencyModel({"cache": False, "int8": int8, **QUICK})
    root = randomized(TinyNet())
    meter = SpeedMeter(model, root, (torch.randn(2, 3, 8, 8),))
    for _ in range(2):
        assert meter.speedup(randomized(TinyNet()), threshold=2.0, expected=4.0) == 4.0  # one short timing each
    scratch = meter._scratch.name
    meter.close()
    if int8:
        assert timed == [("int8:original.int8.onnx", f"int8:candidate{i}.int8.onnx") for i in (1, 2)]
    else:
        assert timed == [("float:original.onnx", "module")] * 2
    assert not Path(scratch).exists()


class _Report:
    """What ``SpeedMeter`` reads of a ``BenchmarkReport``: one result's speedup."""

    def __init__(self, speedup: float):
        self.results = [type("Result", (), {"speedup": speedup})()]


def test_int8_times_are_cached_apart_and_float_keys_unchanged(tmp_path):
    layer, shape = nn.Conv2d(16, 16, 3), (1, 16, 8, 8)
    float_key = LatencyModel({"cache": tmp_path / "c.json"}).key(layer, shape, "tucker2", 8)
    int8_key = LatencyModel({"cache": tmp_path / "c.json", "int8": True}).key(layer, shape, "tucker2", 8)
    assert int8_key != float_key and '"int8":true' in int8_key and "int8" not in float_key


def test_int8_timing_needs_onnxruntime():
    with pytest.raises(ConvfactorError, match="int8 timing needs runtime 'onnxruntime'"):
        LatencyOptions.from_any({"int8": True, "runtime": "torch"})
