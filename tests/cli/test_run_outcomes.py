"""What a run says it did: layers it cannot rewrite, a run that replaced nothing, a target met or missed,
a demo cut short, a phase cut short, and the errors that point to the right fix."""

from __future__ import annotations

import argparse
import json
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import convfactor
from convfactor import progress
from convfactor.cli.inspect_table import format_inspect_table
from convfactor.cli.target_options import policy_from_options
from convfactor.errors import ConvfactorError, PolicyError
from convfactor.target_outcome import render_target, target_outcome
from passes import PassFailed, run_passes
from tests.cli_models import TinyNet, randomized

ARCH = "tests.cli_models:tiny_net"
SHAPE = "1,3,8,8"
X = torch.randn(1, 3, 8, 8)

VOLUME_NET = '''
import torch
from torch import nn


class VolumeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c3 = nn.Conv3d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.c3(x).mean(dim=(2, 3, 4)))


def build():
    return VolumeNet()
'''


class MyConv(nn.Conv2d):
    """A subclass: its forward may differ from Conv2d's, so convfactor must leave it alone."""


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.custom = MyConv(8, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)

    def forward(self, x):
        return self.up(self.custom(self.conv(x)))


# -- layers convfactor does not rewrite ------------------------------------------------------------
def test_unsupported_layers_are_listed_with_their_reason():
    report = convfactor.get_report(convfactor.factorize(Mixed(), "spatial_svd", X))
    rows = {d.name: d for d in report.layers}
    assert rows["conv"].status == "replaced"
    assert rows["custom"].status == "skipped" and "subclass of Conv2d (MyConv)" in rows["custom"].reason
    assert rows["up"].status == "skipped" and "transposed" in rows["up"].reason
    table = report.format_table()
    assert "ConvTranspose2d" in table and "MyConv" in table


def test_a_rule_naming_a_conv3d_layer_is_told_why(tmp_path):
    (tmp_path / "volume.py").write_text(VOLUME_NET)
    from convfactor.files.architecture import resolve_arch

    model = resolve_arch(f"{tmp_path}/volume.py:build", {}).build()
    with pytest.raises(PolicyError, match=r"names 'c3', a Conv3d: unsupported: Conv3d"):
        convfactor.factorize(model, {"rules": [{"match": "c3", "method": "spatial_svd"}]}, torch.randn(1, 3, 4, 4, 4))


def test_a_run_that_replaces_nothing_exits_3_with_the_reasons_and_writes_nothing(cli, tmp_path):
    (tmp_path / "volume.py").write_text(VOLUME_NET)
    arch = f"{tmp_path}/volume.py:build"
    from convfactor.files.architecture import resolve_arch

    torch.save(resolve_arch(arch, {}).build().state_dict(), tmp_path / "volume.pt")
    before = sorted(os.listdir(tmp_path))
    code, _, err = cli("convert", tmp_path / "volume.pt", "--arch", arch, "--input-shape", "1,3,4,4,4",
                       "--policy", "spatial_svd:0.5", "--out", tmp_path / "fast.pt", "--quiet")
    assert code == 3, err
    assert err.count("error:") == 1 and "nothing was replaced" in err
    assert "c3: unsupported: Conv3d" in err and "fc: spatial_svd" in err and "nothing written" in err
    assert sorted(os.listdir(tmp_path)) == before


def test_a_model_of_unsupported_layers_only_lists_them_and_replaces_nothing():
    model = nn.Sequential(nn.Conv3d(3, 4, 3), nn.ConvTranspose3d(4, 2, 2))
    report = convfactor.get_report(convfactor.factorize(model, "spatial_svd:0.5", torch.randn(1, 3, 5, 5, 5)))
    assert [(d.name, d.layer_type, d.status) for d in report.layers] == [("0", "Conv3d", "skipped"),
                                                                         ("1", "ConvTranspose3d", "skipped")]
    assert report.warnings[-1].startswith("nothing was replaced: 0: unsupported: Conv3d")


def test_the_api_says_when_nothing_was_replaced():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    report = convfactor.get_report(convfactor.factorize(model, {"rules": [{"match": "*", "method": "skip"}]}, X))
    assert any(w.startswith("nothing was replaced: 0, 2: rule 1: skip") for w in report.all_warnings())


# -- targets ---------------------------------------------------------------------------------------
def _args(**values):
    base = {"policy": None, "method": None, "target": None}
    return argparse.Namespace(**{**base, **values})


def test_target_and_method_merge_with_a_policy_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("target: {macs: 0.3}\nrules:\n  - {match: conv1, method: skip}\n")
    policy, sources = policy_from_options(_args(policy=str(path), method="auto", target=("macs", 0.5)))
    assert policy.target == ("macs", 0.5) and sources == {"rules": "--policy + --method", "target": "--target"}
    assert [(r.match, r.method) for r in policy.rules] == [("conv1", "skip"), ("*", "auto")]
    policy, sources = policy_from_options(_args(target=("latency", 0.8)))
    assert [(r.match, r.method) for r in policy.rules] == [("*", "auto")] and sources["rules"] == "--method"
    policy, sources = policy_from_options(_args(policy=str(path)))
    assert policy.target == ("macs", 0.3) and sources["target"] == "policy"
    with pytest.raises(ConvfactorError, match="convert needs a policy"):
        policy_from_options(_args())


def test_target_outcome_says_met_or_missed_by_how_much():
    report = SimpleNamespace(macs_ratio=0.62, params_ratio=0.4, extra={})
    missed = target_outcome(("macs", 0.5), "--target", report)
    assert missed["met"] is False and missed["by"] == pytest.approx(0.12)
    assert render_target(missed) == "macs 0.5 (--target): 0.620 counted on the result, MISSED by 0.12"
    met = target_outcome(("params", 0.5), "policy", report)
    assert met["met"] is True and render_target(met).endswith("met")
    predicted = target_outcome(("latency", 0.8), "--target", SimpleNamespace(
        extra={"auto": {"target": {"predicted_fraction": 0.7}}}))
    assert predicted["met"] is True and "add --bench to measure" in predicted["basis"]
    unknown = target_outcome(("latency", 0.8), "--target", SimpleNamespace(extra={}))
    assert unknown["met"] is None and render_target(unknown).endswith("not measured (add --bench)")


def test_cli_target_without_yaml_reports_its_outcome(cli, tmp_path, ckpt):
    code, out, err = cli("convert", ckpt, "--arch", ARCH, "--input-shape", SHAPE, "--target", "params=0.6",
                         "--out", tmp_path / "fast.pt", "--json")
    assert code == 0, err
    document = json.loads(out)
    target = document["target"]
    assert target["kind"] == "params" and target["asked"] == 0.6 and target["from"] == "--target"
    assert target["measured"] == pytest.approx(document["factorize"]["totals"]["params_ratio"])
    assert target["met"] == (target["measured"] <= 0.6) and document["summary"]["target"] == target
    assert document["policy_from"] == {"rules": "--method", "target": "--target"}


def test_check_inputs_of_another_size_with_bench_runs_to_the_end(cli, tmp_path, ckpt):
    torch.save(torch.randn(4, 3, 12, 12), tmp_path / "check.pt")
    code, out, err = cli("convert", ckpt, "--arch", ARCH, "--input-shape", SHAPE, "--policy", "spatial_svd:0.5",
                         "--out", tmp_path / "fast.pt", "--check", "--check-inputs", tmp_path / "check.pt",
                         "--max-rel-l2", "1", "--min-cosine", "0", "--min-snr-db", "-100", "--min-top1", "0",
                         "--bench", "--threads", "1", "--warmup", "0", "--repeats", "2", "--min-time", "0")
    assert code == 0, err
    assert "note: --check-inputs" in err and "3,12,12" in err
    assert (tmp_path / "fast.pt").exists()


# -- the demo, cut short -----------------------------------------------------------------------------
def test_an_interrupted_demo_leaves_nothing_and_a_finished_one_publishes_all(tmp_path, monkeypatch):
    from convfactor import demo

    out = tmp_path / "demo"

    def interrupted(model_name, budgets, out_dir, work, *rest):
        (work / "original.onnx").write_bytes(b"onnx")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out_dir=out, say=lambda _: None)
    assert not out.exists()  # not even the directory it created

    def finished(model_name, budgets, out_dir, work, *rest):
        (work / "original.onnx").write_bytes(b"onnx")
        (work / "report.json").write_text("{}")
        return {"files": [str(out_dir / "report.json")]}

    monkeypatch.setattr(demo, "_run", finished)
    demo.run_demo(out_dir=out, say=lambda _: None)
    assert sorted(os.listdir(out)) == ["original.onnx", "report.json"]
    with pytest.raises(ConvfactorError, match="original.onnx exists"):
        demo.run_demo(out_dir=out, say=lambda _: None)


# -- progress lines ----------------------------------------------------------------------------------
def test_progress_lines_count_in_words_and_a_cut_phase_is_not_done(capsys):
    for _ in progress.track([1], "lines", "calibration", unit="batch"):
        pass
    with pytest.raises(RuntimeError), progress.phase("lines", "refit", total=3, unit="batch") as bar:
        bar.update()
        raise RuntimeError("boom")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "calibration: started (1 batch)" and lines[1].startswith("calibration: 1/1 batch [")
    assert lines[2] == "refit: started (3 batches)"
    assert lines[3].startswith("refit: 1/3 batches [") and lines[3].endswith(", stopped]") and "done" not in lines[3]


# -- errors pointing to the fix ---------------------------------------------------------------------------
def test_export_with_the_wrong_arch_names_the_right_one(cli, tmp_path, ckpt):
    code, _, err = cli("convert", ckpt, "--arch", ARCH, "--input-shape", SHAPE, "--policy", "spatial_svd:0.5",
                       "--out", tmp_path / "fast.pt", "--quiet")
    assert code == 0, err
    code, _, err = cli("export", tmp_path / "fast.pt", "--arch", "tests.cli_models:gated_net", "--onnx",
                       tmp_path / "fast.onnx", "--quiet")
    assert code == 2 and err.count("\n") == 1
    assert f"give --arch {ARCH} without --arch-args" in err and "--no-trace" not in err
    assert not (tmp_path / "fast.onnx").exists()


def test_a_bug_in_a_pass_says_so_and_is_not_a_user_error():
    def broken(module):
        raise IndexError("list index out of range")

    with pytest.raises(PassFailed, match=r"IndexError: a bug in the pass, not in its input") as info:
        run_passes(nn.Linear(2, 2), [broken])
    assert not isinstance(info.value, ConvfactorError)


def test_macs_not_counted_names_the_cli_flag_too():
    report = convfactor.get_report(convfactor.factorize(randomized(TinyNet()), "spatial_svd:0.5"))
    assert "MACs: n/a (give example inputs to count them: example_inputs=..., CLI: --input-shape)" in str(report)


def test_inspect_fits_100_columns_with_long_layer_names():
    model = nn.Sequential()
    model.add_module("encoder_stage_one_block_zero_convolution_a", nn.Conv2d(3, 8, 3, padding=1))
    model.add_module("encoder_stage_one_block_zero_convolution_b", nn.Conv2d(8, 8, 3, padding=1))
    text = format_inspect_table(convfactor.inspect_model(model, X))
    assert max(map(len, text.splitlines())) <= 100, text
    assert "not shown for width:" in text and "--wide" in text
    header = text.splitlines()[0]
    assert "spsvd" in header and "tuck2" in header and "sal" not in header.split()  # the opt-in forms go first
