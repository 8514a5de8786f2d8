"""The demo's pieces: stated tie order, one shared original latency, checkable speedups, no noisy headline."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from convfactor.demo import _summary_table, heaviest_layers
from convfactor.runtime.export import export_onnx
from convfactor.runtime.shared_timing import time_together


def test_heaviest_layers_break_ties_in_model_order():
    macs = {"stem": 5, "b": 9, "a": 9, "c": 1, "d": 9}
    assert heaviest_layers(macs, 4) == ["b", "a", "d", "stem"]  # not alphabetical: the model's order


def _row(budget, latency, reliable=True):
    return {"budget": budget, "macs": 40e6 if budget is None else budget * 40e6, "params": 1e5, "accuracy": 0.97,
            "agreement": 1.0, "latency_ms": latency, "speedup_reliable": reliable, "score": 0.1,
            "speedup": 2.342 / latency}


def test_summary_speedups_are_the_printed_original_latency_over_each_row():
    text = _summary_table([_row(None, 2.3421), _row(0.5, 1.1163), _row(0.25, 0.9)], rounds=100, threads=1)
    rows = [line.split() for line in text.splitlines() if re.match(r"\s+(original|MACs<=)", line)]
    original_ms = float(rows[0][5].removesuffix("ms"))
    assert original_ms == 2.342
    for row in rows:
        latency, speedup = float(row[5].removesuffix("ms")), float(row[6].removesuffix("x"))
        assert speedup == pytest.approx(original_ms / latency, abs=0.005)  # what a reader can check
    assert "speedup = 2.342 ms / latency" in text


def test_summary_never_headlines_a_noisy_speedup():
    text = _summary_table([_row(None, 2.0), _row(0.5, 0.2, reliable=False)], rounds=10, threads=1)
    line = next(line for line in text.splitlines() if "MACs<=0.5" in line)
    assert "noisy" in line and "10.00x" not in line
    assert "too busy to tell" in text


def test_models_timed_together_share_one_reference(tmp_path):
    torch.manual_seed(0)
    big = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1)).eval()
    small = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)).eval()
    x = torch.randn(1, 3, 16, 16)
    paths = {}
    for name, model in (("original", big), ("small", small), ("same", big)):
        paths[name] = tmp_path / f"{name}.onnx"
        export_onnx(model, x, paths[name], exporter="torchscript")
    timing = time_together(paths, (1, 3, 16, 16), warmup=1, repeats=5, min_time=0.0, remeasure=0)
    assert timing.names == ("original", "small", "same") and timing.rounds == 5
    assert all(timing.stats[n].runs == 5 for n in timing.names)
    for name in ("small", "same"):
        assert timing.speedup(name) == timing.stats["original"].median_ms / timing.stats[name].median_ms
        p10, p90 = timing.ratio_spread[name]
        assert 0 < p10 <= p90
    assert timing.to_dict()["models"]["original"]["speedup"] == 1.0
