"""``convfactor sweep``: bad input is one line and exit 2 before any work; a run writes JSON, PNG and the best model."""

import json

import pytest
import torch

ARCH = "tests.cli_models:tiny_net"
SHAPE = "1,3,8,8"


@pytest.fixture
def calibration(tmp_path):
    path = tmp_path / "x.pt"
    torch.save(torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(3)), path)
    return path


def _sweep(cli, ckpt, *extra):
    return cli("sweep", ckpt, "--arch", ARCH, "--input-shape", SHAPE, *extra)


@pytest.mark.parametrize("argv, message", [
    (["--targets", "flops=0.5"], "--targets: expected KIND=F1,F2,... with KIND one of macs, params, latency"),
    (["--targets", "macs=0.5,0"], "--targets: macs fraction '0' is not a number in (0, 1)"),
    (["--targets", "macs=1.5"], "--targets: macs fraction '1.5' is not a number in (0, 1)"),
    (["--targets", "macs=0.5", "latency=x"], "--targets: latency fraction 'x' is not a number in (0, 1)"),
    (["--targets", "macs=0.5,0.5"], "--targets: macs=0.5 is given twice"),
    (["--targets", "macs=0.5", "--calibration", "missing.pt"], "--calibration"),
    (["--targets", "macs=0.5", "--baseline", "nope"], "--baseline nope: unknown method"),
    (["--targets", "macs=0.5", "--workers", "0"], "--workers: expected a whole number >= 1"),
    (["--targets", "macs=0.5", "--workers", "2", "--scheduler", "tcp://h:8786"], "--workers and --scheduler"),
    (["--targets", "macs=0.5", "--scheduler", "h:8786"], "--scheduler h:8786: expected an address like tcp://"),
    (["--targets", "macs=0.5", "--max-metric-drop", "0.01"], "needs --metric"),
    (["--targets", "macs=0.5", "--save-best", "best.onnx"], "--save-best"),
    (["--targets", "macs=0.5", "--keep-float", "Gemm"], "--calibrate-method and --keep-float are only used with "
                                                       "--quantize int8"),
    (["--targets", "macs=0.5", "--calibrate-method", "entropy"], "only used with --quantize int8"),
    (["--targets", "macs=0.5", "--quantize", "int4"], "--quantize: invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_work(cli, ckpt, tmp_path, argv, message, monkeypatch):
    import convfactor.sweeps.driver as driver

    monkeypatch.setattr(driver, "factorize", lambda *a, **k: pytest.fail("work started"))
    argv = [str(tmp_path / a) if a.endswith((".pt", ".onnx")) else a for a in argv]
    code, out, err = _sweep(cli, ckpt, *argv, "--out", tmp_path / "s.json")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], err
    assert "Traceback" not in err and not (tmp_path / "s.json").exists()


def test_an_existing_output_is_not_overwritten_without_force(cli, ckpt, tmp_path):
    (tmp_path / "s.json").write_text("{}")
    code, _, err = _sweep(cli, ckpt, "--targets", "macs=0.5", "--out", tmp_path / "s.json")
    assert code == 2 and "exists" in err and (tmp_path / "s.json").read_text() == "{}"
    code, _, err = _sweep(cli, ckpt, "--targets", "macs=0.5", "--out", tmp_path / "s.txt")
    assert code == 2 and "must end in .json" in err


def test_a_sweep_writes_its_json_png_and_the_best_model(cli, ckpt, tmp_path, calibration):
    import convfactor

    out, best = tmp_path / "s.json", tmp_path / "best.pt"
    code, stdout, err = _sweep(cli, ckpt, "--policy", "spatial_svd", "--calibration", calibration, "--no-refit",
                               "--targets", "macs=0.7,0.4", "--out", out, "--save-best", best,
                               "--min-time", "0.05", "--repeats", "5", "--max-rel-error", "1.0")
    assert code == 0, err
    document = json.loads(out.read_text())
    labels = [p["label"] for p in document["points"]]
    assert labels[:2] == ["macs=0.7", "macs=0.4"] and len(labels) == 4
    assert all(label.startswith("uniform spatial_svd r=") for label in labels[2:])
    assert [p["baseline"] for p in document["points"]] == [False, False, True, True]
    for point in document["points"]:
        assert point["speedup"] > 0 and 0 <= point["rel_error"] and point["outputs"][0]["name"]
        assert point["macs_fraction"] <= point["fraction"] + 1e-9 or point["baseline"]
    computed = dict(document["shared"]["computed"])
    assert computed.pop("candidate errors") > 0
    assert computed == {"statistics": 1, "candidates": 1, "sensitivities": 1, "reference outputs": 3}
    assert document["data"] == "5 held-out calibration samples" and document["pareto_front"]
    assert document["best"] in labels[:2] and document["outputs"]["best"]["point"] == document["best"]
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Pareto front" in stdout and "uniform spatial_svd" in stdout
    from tests.cli_models import tiny_net

    reloaded = convfactor.load(best, arch=tiny_net)
    x = torch.randn(2, 3, 8, 8)
    chosen = document["points"][labels.index(document["best"])]
    assert convfactor.get_report(reloaded).policy["resolved"]["rules"] == chosen["allocation"]
    assert reloaded(x).shape == (2, 4)


def test_an_int8_best_is_written_as_a_checkpoint_and_its_int8_file(cli, ckpt, tmp_path, calibration, monkeypatch):
    import onnx

    import convfactor
    import convfactor.sweeps.measure as measure
    from tests.cli_models import tiny_net

    real = measure.PointMeter.speed

    def int8_faster(self, model, name):  # the measured timing, its speedup made to favour int8: best is int8
        speed = real(self, model, name)
        return None if speed is None else {**speed, "speedup": 3.0 if name.endswith(" int8") else 1.5}

    monkeypatch.setattr(measure.PointMeter, "speed", int8_faster)
    (tmp_path / "old.int8.onnx").write_text("keep")
    code, _, err = _sweep(cli, ckpt, "--calibration", calibration, "--targets", "macs=0.5", "--quantize", "int8",
                          "--out", tmp_path / "s.json", "--save-best", tmp_path / "old.pt", "--no-refit",
                          "--min-time", "0.02", "--repeats", "3")
    assert code == 2 and "old.int8.onnx" in err and "exists" in err and not (tmp_path / "s.json").exists()
    out, best = tmp_path / "s.json", tmp_path / "best.pt"
    code, stdout, err = _sweep(cli, ckpt, "--calibration", calibration, "--targets", "macs=0.5", "--quantize", "int8",
                               "--keep-float", "Gemm", "--out", out, "--save-best", best, "--no-refit",
                               "--min-time", "0.02", "--repeats", "3", "--max-rel-error", "1.0")
    assert code == 0, err
    document = json.loads(out.read_text())
    labels = [p["label"] for p in document["points"]]
    assert labels[:3] == ["macs=0.5", "macs=0.5 int8", "original int8"] and labels[3].startswith("uniform")
    assert document["quantize"]["keep_float"] == ["Gemm"] and document["quantize"]["calibration_samples"] == 35
    assert document["points"][1]["quantize"]["float_compute_nodes"] == {"Gemm": 1}
    assert document["best"] == "macs=0.5 int8" and document["outputs"]["best"] == {
        "path": str(best), "point": "macs=0.5 int8", "int8_onnx": str(tmp_path / "best.int8.onnx")}
    graph = onnx.load(str(tmp_path / "best.int8.onnx"))
    assert any(node.op_type == "QuantizeLinear" for node in graph.graph.node)
    assert "macs=0.5 int8" in stdout and "best.int8.onnx" in stdout
    reloaded = convfactor.load(best, arch=tiny_net)  # the float model the int8 file was quantized from
    assert convfactor.get_report(reloaded).policy["resolved"]["rules"] == document["points"][1]["allocation"]


@pytest.mark.parametrize("targets, timed_int8", [(["macs=0.5", "latency=0.8"], True), (["macs=0.5"], False)])
def test_with_quantize_latency_targets_are_timed_on_int8_graphs(cli, ckpt, tmp_path, calibration, monkeypatch,
                                                                targets, timed_int8):
    import convfactor.sweeps as sweeps
    from convfactor.errors import ConvfactorError

    seen = {}

    def stop(*args, **kwargs):  # the arguments the sweep would run with, then stop before any work
        seen.update(kwargs)
        raise ConvfactorError("stopped by the test")

    monkeypatch.setattr(sweeps, "sweep", stop)
    code, _, err = _sweep(cli, ckpt, "--calibration", calibration, "--targets", *targets, "--quantize", "int8",
                          "--out", tmp_path / "s.json")
    assert code != 0 and "stopped by the test" in err
    assert ("timed on int8 graphs" in err) == timed_int8
    assert seen["latency"] == ({"int8": True} if timed_int8 else None)
    assert seen["quantize"] == "int8"
