"""``sweep(quantize="int8")``: each point and the original also in int8, measured on the same held-out samples."""

import numpy as np
import pytest
import torch

import convfactor
import convfactor.sweeps.measure as measure
from convfactor.errors import ConvfactorError
from convfactor.runtime.onnx_module import OnnxModule

from .conftest import FAST

# Held-out worst-slice error the int8 form may add to its float point's on the tiny net (measured: 0.0157 float,
# 0.0169 int8 at macs=0.6; 0.0054 for the original in int8): 7-bit weights and uint8 activations.
INT8_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def quantized(net, data):
    seen = []
    real = measure.quantize_onnx

    def spy(path, out, calibration, **options):
        seen.append(calibration)
        return real(path, out, calibration, **options)

    def agreement(model):
        return float((model(data).argmax(1) == net(data).argmax(1)).float().mean())

    patch = pytest.MonkeyPatch()
    patch.setattr(measure, "quantize_onnx", spy)
    try:
        result = convfactor.sweep(net, "macs=0.6", data[:1], calibration=data, auto_options=FAST, baseline=None,
                                  bench={"min_time": 0.02, "repeats": 3, "warmup": 1}, metric=agreement,
                                  quantize="int8")
    finally:
        patch.undo()
    return result, seen


def test_each_point_and_the_original_get_an_int8_row(quantized):
    result, _ = quantized
    assert [p.label for p in result.points] == ["macs=0.6", "macs=0.6 int8", "original int8"]
    float_, int8, original = result.points
    assert (int8.quantized, original.quantized, float_.quantized) == ("int8", "int8", None)
    assert int8.macs_fraction == float_.macs_fraction and original.macs_fraction == 1.0
    assert int8.quantize["mode"] == "static" and int8.quantize["quantized_compute"] > 0
    assert abs(int8.rel_error - float_.rel_error) <= INT8_TOLERANCE and original.rel_error <= INT8_TOLERANCE
    assert all(p.speedup is not None and p.speedup > 0 for p in result.points)
    assert all(p.metric is not None for p in result.points)
    assert isinstance(result.models["macs=0.6 int8"], OnnxModule)
    assert [result.points[i].label for i in result.front] and all(result.points[i].kind != "original"
                                                                  for i in result.front)


def test_int8_rows_are_measured_on_the_check_samples_and_calibrated_without_them(quantized, net, data):
    result, seen = quantized
    check = data[7::8]  # convfactor.auto.statistics.split: sample i % 8 == 7
    assert result.data == "5 held-out calibration samples"
    for label in ("macs=0.6 int8", "original int8"):
        point = next(p for p in result.points if p.label == label)
        with torch.no_grad():
            got, want = result.models[label](check), net(check)
        # the output's one slice is the whole (N, 10) tensor: the relative L2 error over it
        assert float((got - want).norm() / want.norm()) == pytest.approx(point.rel_error, rel=1e-3)
    assert len(seen) == 2 and result.quantize["calibration_samples"] == 35
    for calibration in seen:
        used = torch.cat([batch[0] for batch in calibration])
        assert len(used) == 35
        assert not any(torch.equal(row, sample) for row in used for sample in check)


def test_the_json_names_how_each_int8_point_was_made(quantized):
    result, _ = quantized
    document = result.to_dict()
    assert document["quantize"]["type"] == "int8" and document["quantize"]["calibrate_method"] == "minmax"
    rows = {p["label"]: p for p in document["points"]}
    assert rows["macs=0.6"]["quantized"] is None and rows["macs=0.6"]["quantize"] is None
    assert rows["macs=0.6 int8"]["quantize"]["calibration_samples"] == 35
    assert "path" not in rows["macs=0.6 int8"]["quantize"]
    assert "int8: onnxruntime int8" in result.table() and "macs=0.6 int8" in result.table()


def test_the_best_may_be_an_int8_point_and_never_the_original_int8():
    from convfactor.sweeps.result import SweepPoint, SweepResult

    def point(label, kind, speedup, quantized=None):
        return SweepPoint(label=label, kind=kind, fraction=0.5, baseline=False, macs_fraction=0.5, params_fraction=0.5,
                          rel_error=0.01, worst=None, outputs=[], within_bound=True, speedup=speedup,
                          quantized=quantized)

    points = [point("macs=0.5", "macs", 1.5), point("macs=0.5 int8", "macs", 2.5, "int8"),
              point("original int8", "original", 3.0, "int8")]
    result = SweepResult(points=points, models={}, bound={}, data="", shared={}, bench=None, seconds=0.0)
    assert result.best().label == "macs=0.5 int8"
    assert [points[i].label for i in result.front] == ["macs=0.5 int8"]
    for p in points:
        p.speedup = None  # untimed: the fewest MACs, the float point before its int8 form
    assert result.best().label == "macs=0.5"


@pytest.mark.parametrize("kwargs, message", [
    ({"quantize": "int4"}, "quantize='int4'; choose int8"),
    ({"quantize_options": {"keep_float": ["Gemm"]}}, "only used with quantize='int8'"),
    ({"quantize": "int8", "quantize_options": {"bits": 4}}, "unknown quantize option(s) bits"),
    ({"quantize": "int8", "quantize_options": {"calibrate_method": "max"}}, "calibrate_method 'max'"),
])
def test_bad_quantize_arguments_fail_before_any_work(net, data, kwargs, message, monkeypatch):
    import convfactor.sweeps.driver as driver

    monkeypatch.setattr(driver, "factorize", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ConvfactorError, match=message.replace("(", r"\(").replace(")", r"\)")):
        convfactor.sweep(net, "macs=0.5", data[:1], **kwargs)


def test_a_static_batch_graph_runs_any_batch_in_chunks(tmp_path, net, data):
    from convfactor.runtime.export import export_onnx

    path = tmp_path / "static.onnx"
    export_onnx(net, (data[:4],), path, dynamic_batch=False, exporter="torchscript")
    module = OnnxModule(path)
    assert module.batch == 4
    with torch.no_grad():
        np.testing.assert_allclose(module(data[:10]).numpy(), net(data[:10]).numpy(), rtol=1e-4, atol=1e-5)
    module.save(tmp_path / "copy.onnx")
    with pytest.raises(ConvfactorError, match="exists"):
        module.save(tmp_path / "copy.onnx")
