"""Replacements that save no MACs are flagged in the report and the CLI, and ``only_if_cheaper`` skips them."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import convfactor
from convfactor.errors import PolicyError
from convfactor.policy import Policy
from tests.cli_models import TinyNet, randomized

X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class Downsample(nn.Module):
    """A 3x3 conv and a strided 1x1 downsample conv (16 -> 32), as in a ResNet block."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.down = nn.Conv2d(16, 32, 1, stride=2)

    def forward(self, x):
        return self.conv(x)[..., ::2, ::2] + self.down(x)


def _decision(report, name):
    return next(d for d in report.layers if d.name == name)


def test_tucker2_on_a_1x1_downsample_raises_its_macs_and_is_flagged():
    model = Downsample().eval()
    x = torch.randn(1, 16, 8, 8)
    fast = convfactor.factorize(model, {"rules": [{"method": "tucker2", "rank": 0.5}]}, x)
    report = convfactor.get_report(fast)
    down = _decision(report, "down")
    assert down.status == "replaced" and down.macs_ratio > 1  # 1x1 (16->8) + 1x1 core (8->16) + 1x1 (16->32)
    assert [w["layer"] for w in report.costlier] == ["down"]
    assert report.costlier[0]["macs_ratio"] == pytest.approx(down.macs_ratio)
    text = str(report)
    assert "warning" in text and "down" in text and "only_if_cheaper" in text
    assert json.loads(report.to_json())["costlier"][0]["layer"] == "down"


def test_only_if_cheaper_skips_what_would_cost_more_and_says_why():
    model = Downsample().eval()
    x = torch.randn(1, 16, 8, 8)
    fast = convfactor.factorize(model, {"rules": [{"method": "tucker2", "rank": 0.5, "only_if_cheaper": True}]}, x)
    report = convfactor.get_report(fast)
    down, conv = _decision(report, "down"), _decision(report, "conv")
    assert down.status == "skipped" and "only_if_cheaper" in down.reason and "x" in down.reason
    assert conv.status == "replaced" and conv.macs_ratio < 1
    assert report.costlier == []
    with torch.no_grad():
        assert torch.equal(fast.down(x), model.down(x))  # left exactly as it was


def test_shorthands_that_compress_default_to_only_if_cheaper():
    assert Policy.from_any("spatial_svd:0.5").rules[0].only_if_cheaper
    assert Policy.from_any("tucker2:energy=0.9").rules[0].only_if_cheaper
    assert not Policy.from_any("spatial_svd").rules[0].only_if_cheaper  # full rank: an exact rewrite
    assert not Policy.from_any("spatial_svd:1.0").rules[0].only_if_cheaper
    assert not Policy.from_dict({"rules": [{"method": "svd", "rank": 0.5}]}).rules[0].only_if_cheaper
    model = randomized(TinyNet())
    report = convfactor.get_report(convfactor.factorize(model, "spatial_svd:0.5", X))
    proj = _decision(report, "proj")  # 16->16 1x1: spatial SVD at half rank keeps all its MACs
    assert proj.status == "skipped" and "only_if_cheaper" in proj.reason
    assert all(d.macs_ratio < 1 for d in report.replaced)


def test_only_if_cheaper_round_trips_and_is_validated():
    policy = Policy.from_dict({"rules": [{"method": "svd", "rank": 0.5, "only_if_cheaper": True}]})
    assert Policy.from_dict(policy.to_dict()) == policy
    with pytest.raises(PolicyError, match="'only_if_cheaper' must be true or false"):
        Policy.from_dict({"rules": [{"method": "svd", "only_if_cheaper": "yes"}]})


def test_print_report_shows_the_weight_based_selection_notice():
    model = randomized(TinyNet())
    fast = convfactor.factorize(model, {"rules": [{"types": ["Conv2d"], "method": "spatial_svd"}],
                                        "target": {"macs": 0.8}}, X)
    report = convfactor.get_report(fast)
    assert "no calibration data" in report.extra["auto"]["selection"]
    assert "no calibration data" in str(report)


def test_cli_warns_about_a_costlier_replacement(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from convfactor.cli import main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    ckpt = tmp_path / "net.pt"
    torch.save(randomized(TinyNet()).state_dict(), ckpt)
    code = main(["convert", str(ckpt), "--arch", "tests.cli_models:tiny_net", "--policy", "svd",
                 "--input-shape", "1,3,8,8", "--out", str(tmp_path / "f.pt")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "warning: proj (svd) costs x2.000 the MACs" in err  # full-rank SVD of a square 1x1 conv
    assert "warning: proj (svd)" in out  # and in the printed report


def test_only_if_cheaper_holds_with_calibration_data():
    model = randomized(TinyNet())
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    report = convfactor.get_report(convfactor.factorize(model, "spatial_svd:0.5", x[:1], calibration=x))
    assert _decision(report, "proj").status == "skipped" and report.costlier == []
