"""convert's held-out fidelity options: --validation, --metric, --max-metric-drop, --class-scores.

Each reaches ``factorize`` as the API takes it; the summary says in words whether accuracy was kept, on
which data, beside the in-sample number and the metric.
"""

import json
import re

import pytest
import torch

ARCH = "tests.cli_models:tiny_net"
SHAPE = "1,3,8,8"
METRIC = '''
import torch
_X = torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(9))

def constant(model):
    return float(model(_X).sum() * 0 + 1)  # a constant metric: the bound on it always holds

def broken(model):
    return float("nan")
'''


def _inputs(tmp_path, name, count, seed):
    path = tmp_path / name
    torch.save(torch.randn(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed)), path)
    return path


def _convert(cli, ckpt, *extra, policy="spatial_svd:0.5"):
    return cli("convert", ckpt, "--arch", ARCH, "--input-shape", SHAPE, "--policy", policy,
               "--out", ckpt.with_name("fast.pt"), *extra)


def test_validation_metric_and_class_scores_reach_factorize_and_the_summary(cli, ckpt, tmp_path, calls):
    metric = tmp_path / "metric.py"
    metric.write_text(METRIC)
    code, out, err = _convert(cli, ckpt, "--calibration", _inputs(tmp_path, "c.pt", 32, 1),
                              "--validation", _inputs(tmp_path, "v.pt", 16, 2), "--class-scores", "0",
                              "--metric", f"{metric}:constant", "--max-metric-drop", "0.05", "--json")
    assert code == 0, err
    (call,) = calls
    assert call["validation"].shape == (16, 3, 8, 8) and call["metric"].name == "constant"
    fidelity = call["policy"].fidelity
    assert fidelity.max_metric_drop == 0.05 and fidelity.output_spec(0).kind == "scores"
    document = json.loads(out)
    check = document["factorize"]["extra"]["fidelity_check"]
    assert check["data"] == "validation samples" and check["samples"] == 8 and check["held_out"]
    assert check["metric"] == 1.0 and check["metric_original"] == 1.0 and check["agreement"] is not None
    assert document["factorize"]["extra"]["auto"]["data_split"]["fit"] == 32  # all calibration fits
    code, text, _ = _convert(cli, ckpt, "--calibration", _inputs(tmp_path, "c.pt", 32, 1), "--force",
                             "--validation", _inputs(tmp_path, "v.pt", 16, 2), "--metric", f"{metric}:constant")
    assert code == 0 and "accuracy kept" in text and "held-out data" in text, text
    assert re.search(r"constant +1 -> 1 \(original -> result", text) and "constant: 1 (original) -> 1 (result)" in text


@pytest.mark.parametrize("extra, message", [
    (("--max-metric-drop", "0.1"), "--max-metric-drop (or the policy's max_metric_drop/min_metric) needs --metric"),
    (("--max-metric-drop", "-1"), "--max-metric-drop: expected a number >= 0"),
    (("--metric", "nomodule_here:fn"), "--metric nomodule_here:fn: no module named 'nomodule_here'"),
    (("--metric", "json"), "--metric must look like 'package.module:function'"),
    (("--calibration", "CAL", "--class-scores", "x"), "error: policy: fidelity outputs 'x' names no output"),
    (("--calibration", "CAL", "--metric", "json:loads"), "error: metric 'loads' failed with TypeError"),
])
def test_bad_fidelity_options_are_one_line_errors(cli, ckpt, tmp_path, extra, message):
    extra = [str(_inputs(tmp_path, "c.pt", 32, 1)) if e == "CAL" else e for e in extra]
    code, _, err = _convert(cli, ckpt, *extra)
    assert code == 2 and message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert not ckpt.with_name("fast.pt").exists()


def test_a_metric_that_returns_nan_is_named(cli, ckpt, tmp_path):
    metric = tmp_path / "metric.py"
    metric.write_text(METRIC)
    code, _, err = _convert(cli, ckpt, "--calibration", _inputs(tmp_path, "c.pt", 32, 1),
                            "--metric", f"{metric}:broken")
    assert code == 2 and "error: metric 'broken' must return a finite number, got nan" in err
