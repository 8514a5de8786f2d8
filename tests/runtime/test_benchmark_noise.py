"""A speedup measured on a machine too noisy to tell is re-measured, and never shown as a headline."""

from __future__ import annotations

import copy

import pytest
from torch import nn

from convfactor.runtime import benchmarking
from convfactor.runtime.benchmarking import NOISE_LIMIT, ThreadResult, TimingStats, benchmark
from convfactor.summary import render_summary


def _result(speedup, p10, p90, pairs=50):
    stats = TimingStats(1.0, 0.9, 1.1, 1.0, 0.8, pairs)
    return ThreadResult(1, stats, TimingStats(1.0 / speedup, 0.5, 2.0, 1.0, 0.1, pairs), speedup, p10, p90,
                        pairs, 1.0)


def test_spread_decides_reliability():
    assert _result(1.5, 1.4, 1.6).reliable
    noisy = _result(9.58, 0.18, 13.98)
    assert noisy.spread == pytest.approx((13.98 - 0.18) / 9.58)
    assert noisy.spread > NOISE_LIMIT and not noisy.reliable
    assert noisy.to_dict()["reliable"] is False


@pytest.fixture
def models():
    original = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)).eval()
    return original, copy.deepcopy(original)


def _fake_timings(monkeypatch, results):
    calls = []

    def time_pairs(sessions, inputs, threads, warmup, repeats, min_time, progress):
        calls.append((repeats, min_time))
        return results[len(calls) - 1]

    monkeypatch.setattr(benchmarking, "_time_pairs", time_pairs)
    return calls


def test_a_noisy_measurement_is_repeated_longer_and_the_steadier_one_kept(monkeypatch, models):
    calls = _fake_timings(monkeypatch, [_result(9.58, 0.18, 13.98), _result(1.21, 1.1, 1.3)])
    report = benchmark(*models, input_shape=(1, 3, 8, 8), threads=1, repeats=20, min_time=0.5,
                       exporter="torchscript")
    assert calls == [(20, 0.5), (40, 1.0)]  # the second run: twice the pairs and twice the time
    result = report.results[0]
    assert result.speedup == 1.21 and result.reliable and result.remeasured == 1
    assert "1.21x" in report.render()


def test_a_speedup_that_stays_noisy_is_marked_unreliable_everywhere(monkeypatch, models):
    calls = _fake_timings(monkeypatch, [_result(9.58, 0.18, 13.98)] * 3)
    report = benchmark(*models, input_shape=(1, 3, 8, 8), threads=1, repeats=20, min_time=0.5,
                       exporter="torchscript")
    assert len(calls) == 3  # measured, then re-measured twice
    result = report.results[0]
    assert not result.reliable and result.remeasured == 2
    text = report.render()
    assert "9.58x" not in text and "not reliable" in text and "0.18-13.98" in text
    from convfactor.summary import summarize

    document = {"factorize": {"totals": {"params_before": 1, "params_after": 1, "params_ratio": 1.0,
                                         "macs_before": None, "macs_after": None, "macs_ratio": None,
                                         "layers_replaced": 0, "layers_total": 1}},
                "bench": report.to_dict()}
    summary = summarize(document)
    assert summary["latency"][0]["reliable"] is False
    rendered = render_summary(summary)
    assert "9.58x" not in rendered and "faster" not in rendered and "not reliable" in rendered


def test_remeasure_zero_keeps_the_first_measurement(monkeypatch, models):
    calls = _fake_timings(monkeypatch, [_result(9.58, 0.18, 13.98)])
    report = benchmark(*models, input_shape=(1, 3, 8, 8), threads=1, repeats=20, min_time=0.5,
                       exporter="torchscript", remeasure=0)
    assert len(calls) == 1 and not report.results[0].reliable
