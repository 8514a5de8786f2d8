"""``convfactor bench`` on ONNX files: an int8 model against a float one, shapes from the graph or --input-shape."""

import json

import pytest
import torch

from convfactor.runtime.export import export_onnx
from convfactor.runtime.quantize import quantize_onnx
from tests.cli_models import TinyNet, randomized

ARCH = "tests.cli_models:tiny_net"
TIMING = ["--threads", "1", "--warmup", "0", "--repeats", "3", "--min-time", "0"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A state_dict, its float ONNX (dynamic batch), a static-batch export and the int8 model of the float one."""
    root = tmp_path_factory.mktemp("bench_onnx")
    model = randomized(TinyNet()).eval()
    torch.save(model.state_dict(), root / "net.pt")
    export_onnx(model, (torch.randn(1, 3, 8, 8),), root / "net.onnx", exporter="torchscript")
    export_onnx(model, (torch.randn(2, 3, 8, 8),), root / "static.onnx", exporter="torchscript", dynamic_batch=False)
    quantize_onnx(root / "net.onnx", root / "net.int8.onnx", torch.randn(32, 3, 8, 8, generator=torch.Generator()
                                                                              .manual_seed(0)))
    return root


def test_an_int8_file_is_timed_against_a_float_file(cli, files):
    code, stdout, err = cli("bench", files / "net.int8.onnx", "--baseline", files / "net.onnx", "--input-shape",
                            "4,3,8,8", *TIMING, "--json", "--quiet")
    assert code == 0, err
    document = json.loads(stdout)
    assert document["input"]["kind"] == "onnx" and document["input"]["quantized"] is True
    assert document["baseline"]["quantized"] is False and document["baseline"]["input_shape"][0] == "batch"
    result = document["bench"]["results"][0]
    assert result["threads"] == 1 and result["pairs"] >= 3 and result["speedup"] > 0
    assert document["bench"]["input_shapes"] == [[4, 3, 8, 8]]


def test_a_static_graph_gives_the_shape_and_a_checkpoint_may_be_the_other_side(cli, files):
    code, stdout, err = cli("bench", files / "net.pt", "--arch", ARCH, "--baseline", files / "static.onnx", *TIMING,
                            "--json", "--quiet")
    assert code == 0, err
    document = json.loads(stdout)
    assert document["bench"]["input_shapes"] == [[2, 3, 8, 8]] and document["input"]["kind"] == "state_dict"
    code, stdout, err = cli("bench", files / "static.onnx", *TIMING, "--json", "--quiet")  # alone
    assert code == 0, err
    assert json.loads(stdout)["bench"]["input_shapes"] == [[2, 3, 8, 8]]


@pytest.mark.parametrize("argv, message", [
    (["net.int8.onnx", "--baseline", "net.onnx"], "net.int8.onnx has a dynamic input shape [batch, 3, 8, 8]: give "
                                                  "--input-shape"),
    (["net.int8.onnx", "--baseline", "static.onnx", "--input-shape", "4,3,8,8"],
     "--input-shape 4,3,8,8 does not fit"),
    (["net.int8.onnx", "--baseline", "net.onnx", "--input-shape", "4,3,8,8", "--arch", ARCH],
     "--arch: not used when the models are ONNX files"),
    (["net.pt", "--baseline", "static.onnx", "--arch", ARCH, "--baseline-arch", ARCH],
     "--baseline-arch: not used when the baseline is an ONNX file"),
    (["net.pt", "--baseline", "net.onnx", "--input-shape", "4,3,8,8"], "holds a state_dict: pass --arch"),
    (["junk.onnx"], "CHECKPOINT {root}/junk.onnx is not an ONNX model"),
    (["net.onnx", "--baseline", "missing.onnx"], "baseline checkpoint not found"),
])
def test_bad_onnx_input_is_one_line_and_exit_2(cli, files, argv, message, monkeypatch):
    import convfactor.runtime.benchmarking as benchmarking

    monkeypatch.setattr(benchmarking, "benchmark", lambda *a, **k: pytest.fail("timing started"))
    (files / "junk.onnx").write_text("not a protobuf")
    argv = [str(files / a) if a.endswith((".onnx", ".pt")) else a for a in argv]
    code, _, err = cli("bench", *argv, *TIMING)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and message.format(root=files) in lines[-1], err
    assert "Traceback" not in err
