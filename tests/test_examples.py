"""The examples and the demo run as documented (the README points at each of them)."""

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import convfactor

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def test_api_quickstart_runs(capsys):
    runpy.run_path(str(EXAMPLES / "api_quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "full-rank spatial SVD: relative output error" in out and "layers replaced: 4/4" in out


def test_challenge_score_example(capsys):
    runpy.run_path(str(EXAMPLES / "challenge_score.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("32-bit: score 0.1944 -> ")  # ResNet-20: 272,474 params, 40.8M MACs
    assert lines[1].startswith("16-bit: score 0.0972 -> ")


def test_export_and_check_example(tmp_path, capsys):
    module = runpy.run_path(str(EXAMPLES / "export_and_check.py"))
    module["main"](["--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert (tmp_path / "original.onnx").is_file() and (tmp_path / "factorized.onnx").is_file()
    assert "top1_agreement" in out and "speedup" in out


def test_mixed_policy_file_is_valid_and_mixes_methods():
    policy = convfactor.Policy.load(EXAMPLES / "policy_mixed.yaml")
    methods = {rule.method for rule in policy.rules}
    assert {"skip", "spatial_svd", "tucker2", "svd"} <= methods


@pytest.mark.skipif(shutil.which("convfactor") is None, reason="the convfactor console script is not installed")
def test_convert_checkpoint_script(tmp_path):
    done = subprocess.run(["bash", str(EXAMPLES / "convert_checkpoint.sh"), str(tmp_path)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reloaded ResNet" in done.stdout
    report = json.loads((tmp_path / "resnet20_mixed.report.json").read_text())
    assert report["fidelity"]["passed"] is True
    assert report["summary"]["macs"][2] <= 0.5 + 1e-9


def test_demo_small_run(tmp_path):
    from convfactor.demo import run_demo

    lines = []
    document = run_demo(budgets=[0.5], out_dir=tmp_path, method="spatial_svd", min_time=0.05, progress=False,
                        say=lines.append)
    original, factorized = document["rows"]
    assert original["budget"] is None and factorized["budget"] == 0.5
    assert factorized["macs_ratio"] <= 0.5 + 1e-9
    assert 0.0 <= factorized["accuracy"] <= 1.0 and factorized["speedup"] > 0
    assert abs(original["accuracy"] - document["metadata"]["heldout_accuracy"]) < 0.01
    assert json.loads((tmp_path / "report.json").read_text())["rows"][1]["budget"] == 0.5
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(line.startswith("[5/5] wrote") for line in lines)
    with pytest.raises(convfactor.ConvfactorError, match="exists .*--force"):
        run_demo(budgets=[0.5], out_dir=tmp_path, progress=False, say=lines.append)


def test_demo_cli_rejects_bad_budgets(capsys):
    from convfactor.cli import main

    assert main(["demo", "--budgets", "0.5,2"]) == 2
    assert "budgets must be fractions in (0, 1)" in capsys.readouterr().err
    assert main(["demo", "--budgets", "half"]) == 2


def test_train_script_is_runnable_help():
    done = subprocess.run([sys.executable, str(EXAMPLES / "train_digits.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "--epochs" in done.stdout
