"""The zeros a conversion leaves (p_u), counted on the models themselves: the factorize report, its JSON and
table, the CLI summary (convfactor/report.py, convfactor/summary.py, convfactor convert)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import convfactor
from convfactor.costs import count_zeros
from convfactor.files.serialize import _report_from_dict
from convfactor.summary import render_summary, summarize
from tests.cli_models import TinyNet, randomized

X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(4))
SAL = {"rules": [{"types": ["Conv2d"], "method": "sal", "rank": 2}]}


def _zeros_by_hand(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(int((p == 0).sum()) for p in params), sum(p.numel() for p in params)


def _net_with_some_zeros() -> nn.Module:
    net = randomized(TinyNet())
    with torch.no_grad():
        net.fc.weight[0].zero_()  # 16 zeros the original already has
    return net


def test_the_report_counts_the_exact_zeros_of_both_models() -> None:
    net = _net_with_some_zeros()
    fast = convfactor.factorize(net, SAL, X)
    report = convfactor.get_report(fast)
    assert (report.zeros_before, report.params_before) == _zeros_by_hand(net) and report.zeros_before == 16
    assert (report.zeros_after, report.params_after) == _zeros_by_hand(fast)
    # conv1 (3x8x9) and conv2 (8x16x9) keep 2 of 9 taps; proj is 1x1 (not taken); fc keeps its 16 zeros.
    assert report.zeros_after == 7 * (3 * 8 + 8 * 16) + 16
    assert report.zero_fraction_after == pytest.approx(report.zeros_after / report.params_after, rel=1e-12)
    assert report.zero_fraction_before == pytest.approx(16 / report.params_before, rel=1e-12)
    assert count_zeros(fast) == report.zeros_after
    totals = report.to_dict()["totals"]
    assert (totals["zeros_before"], totals["zeros_after"]) == (16, report.zeros_after)
    assert totals["zero_fraction_after"] == report.zero_fraction_after
    line = next(text for text in str(report).splitlines() if text.startswith("zeros (p_u)"))
    assert line == (f"zeros (p_u): {report.zero_fraction_before:.3f} -> {report.zero_fraction_after:.3f} of the "
                    f"params (16 -> {convfactor.report.human_count(report.zeros_after)} exact zeros)")


def test_the_counts_survive_the_json_round_trip_and_a_dense_method_counts_none() -> None:
    net = randomized(TinyNet())
    report = convfactor.get_report(convfactor.factorize(net, "spatial_svd:0.5", X))
    assert report.zeros_before == report.zeros_after == 0
    again = _report_from_dict(json.loads(report.to_json()))
    assert (again.zeros_before, again.zeros_after) == (0, 0)
    older = {k: v for k, v in report.to_dict().items() if k not in ("zeros_before", "zeros_after")}
    assert _report_from_dict(older).zeros_after == 0  # a report written before the count still loads


def test_the_summary_shows_the_zeros_and_says_when_the_score_does_not_count_them() -> None:
    report = convfactor.get_report(convfactor.factorize(_net_with_some_zeros(), SAL, X))
    document = {"factorize": report.to_dict()}
    summary = summarize(document)
    assert summary["zeros"] == [16, report.zeros_after, report.zero_fraction_before, report.zero_fraction_after]
    text = render_summary(summary)
    assert f"zeros (p_u)      {report.zero_fraction_before:.3f} -> {report.zero_fraction_after:.3f}" in text
    assert f"--unstructured-pruning {report.zero_fraction_after:.3f} counts them" in text
    counted = render_summary(summarize(document, unstructured_pruning=0.5))
    assert "counts them" not in counted and "zeros (p_u)" in counted
    totals = dict(document["factorize"]["totals"])
    for key in ("zeros_before", "zeros_after", "zero_fraction_before", "zero_fraction_after"):
        del totals[key]
    older = summarize({"factorize": {**document["factorize"], "totals": totals}})  # a document from before
    assert "zeros" not in older and "zeros (p_u)" not in render_summary(older)


def test_convert_prints_and_writes_the_produced_models_zeros(cli, tmp_path) -> None:
    net = _net_with_some_zeros()
    ckpt = tmp_path / "net.pt"
    torch.save(net.state_dict(), ckpt)
    policy = tmp_path / "sal.json"
    policy.write_text(json.dumps(SAL))
    base = ["convert", ckpt, "--arch", "tests.cli_models:tiny_net", "--policy", policy, "--input-shape", "1,3,8,8"]
    code, stdout, err = cli(*base, "--out", tmp_path / "sal.pt")
    assert code == 0, err
    document = json.loads((tmp_path / "sal.report.json").read_text())
    produced = convfactor.load(tmp_path / "sal.pt", arch="tests.cli_models:tiny_net")
    zeros, params = _zeros_by_hand(produced)
    assert document["summary"]["zeros"][1] == zeros == 7 * (3 * 8 + 8 * 16) + 16
    assert document["summary"]["zeros"][3] == pytest.approx(zeros / params, rel=1e-12)
    assert f"zeros (p_u)      {16 / params:.3f} -> {zeros / params:.3f}" in stdout
    # Weight sharing replaces every weight by its centroid: the produced model's zeros, not sal's, are counted.
    code, stdout, err = cli(*base, "--out", tmp_path / "shared.pt", "--share-weights", "bits=4")
    assert code == 0, err
    document = json.loads((tmp_path / "shared.report.json").read_text())
    shared = convfactor.load(tmp_path / "shared.pt", arch="tests.cli_models:tiny_net")
    assert document["summary"]["zeros"][1] == _zeros_by_hand(shared)[0] < zeros


def test_a_pruning_form_is_not_warned_about_as_costlier() -> None:
    """sal keeps the layer's MACs and saves zeros: only_if_cheaper keeps it, so no warning may say it would
    skip it; its saving is the zero count."""
    report = convfactor.get_report(convfactor.factorize(randomized(TinyNet()), SAL, X))
    assert [d.method for d in report.replaced] == ["sal", "sal"] and report.replaced[0].macs_ratio == 1.0
    assert report.costlier == [] and not any("only_if_cheaper" in w for w in report.all_warnings())
    assert report.zeros_after > 0
