"""Limits of timing one layer alone: below the timer's resolution no ratios of noise; a wide layer's variants
are timed in groups so the live sessions stay within a memory bound."""

from __future__ import annotations

import time

import pytest
from torch import nn

from convfactor.auto import LatencyModel
from convfactor.auto.latency.options import LatencyOptions
from convfactor.auto.latency.round_robin import RESOLUTION, Timings, round_robin
from convfactor.auto.selection.slow_forms import prefer_fast_forms

LAYER = nn.Conv2d(48, 12, 1)
SHAPE = (1, 48, 80, 80)


def sleeper(seconds):
    return lambda: time.sleep(seconds)


def test_a_variant_below_the_resolution_reads_as_the_floor():
    options = LatencyOptions(repeats=5, max_seconds_per_layer=5.0)
    times = round_robin([sleeper(0.004), sleeper(0.004), sleeper(0.009)], options)  # overhead, tiny, 5 ms
    assert isinstance(times, Timings) and times.floor == pytest.approx(RESOLUTION * 4.0, rel=0.5)
    assert times[1] > 3 * times.floor  # resolved: well above the floor
    assert times[0] >= times.floor  # never below it, never 0


def stub(tmp_path, original_ms, variant_ms, floor):
    def timer(modules, input_shape, options):
        return Timings([original_ms if isinstance(m, nn.Conv2d) else variant_ms for m in modules], floor)

    return LatencyModel({"cache": tmp_path / "latency.json"}, timer=timer)


def test_an_unresolved_original_gives_its_variants_no_ratio_of_noise(tmp_path):
    model = stub(tmp_path, original_ms=0.01, variant_ms=0.05, floor=0.01)  # original at the floor
    original, times = model.layer_times(LAYER, SHAPE, [("svd", 3)])
    assert model.unresolved(LAYER, SHAPE)
    assert times[("svd", 3)] == pytest.approx(original)  # not 5x slower: unknown, so the same
    again = LatencyModel({"cache": tmp_path / "latency.json"}, timer=lambda *a: pytest.fail("re-timed"))
    assert again.unresolved(LAYER, SHAPE)  # the flag is kept in the cache


def test_a_resolved_original_keeps_measured_ratios(tmp_path):
    model = stub(tmp_path, original_ms=0.5, variant_ms=0.2, floor=0.01)
    original, times = model.layer_times(LAYER, SHAPE, [("svd", 3)])
    assert not model.unresolved(LAYER, SHAPE) and times[("svd", 3)] == pytest.approx(0.4 * original)


def test_no_slower_warning_for_a_layer_too_fast_to_time(tmp_path):
    from convfactor.auto.selection.candidates import Option

    class Plan:  # the fields prefer_fast_forms reads
        name, layer, in_shape = "head", LAYER, SHAPE
        chosen = Option("svd", 3, 100, 10)
        options = [chosen]
        decision = None

    Plan.chosen.loss = 0.1
    warnings: list[str] = []
    account, swaps = prefer_fast_forms([Plan], "macs", stub(tmp_path, 0.01, 0.05, floor=0.01), warnings)
    assert warnings == [] and account["slower"] == [] and account["unresolved"] == ["head"] and swaps == {}
    flagged, _ = prefer_fast_forms([Plan], "macs", stub(tmp_path / "b", 0.5, 1.0, floor=0.01), warnings)
    assert flagged["slower"] and "0.50x" in warnings[0]  # a resolved slow form is still said


def test_real_timer_marks_a_tiny_layer_unresolved_or_times_it_above_the_floor(tmp_path):
    model = LatencyModel({"cache": tmp_path / "latency.json", "repeats": 10})
    tiny = nn.Conv2d(4, 4, 1)
    original, times = model.layer_times(tiny, (1, 4, 8, 8), [("svd", 2)])
    assert original > 0 and times[("svd", 2)] > 0
    if model.unresolved(tiny, (1, 4, 8, 8)):
        assert times[("svd", 2)] == pytest.approx(original)


def test_a_wide_layers_variants_are_timed_in_groups_each_with_the_original(tmp_path, monkeypatch):
    from convfactor.auto.latency import model as latency

    batches = []

    def timer(modules, input_shape, options):
        batches.append(modules)
        base = 2.0 + len(batches)  # another load in every group: the ratios must not see it
        return Timings([base if isinstance(m, nn.Conv2d) else base / 2 for m in modules], 1e-4)

    wide = nn.Conv2d(64, 64, 3, padding=1)
    shape = (1, 64, 256, 256)
    per = latency._session_bytes(wide, shape)
    assert per >= 8 * 4 * 2 * 64 * 256 * 256  # input and output, several buffers each
    monkeypatch.setattr(latency, "TIMING_BYTES", 5 * per)  # 3 variants and the original per group
    model = LatencyModel({"cache": tmp_path / "latency.json"}, timer=timer)
    variants = [("spatial_svd", r) for r in (8, 16, 24, 32, 40, 48, 56)]
    original, times = model.layer_times(wide, shape, variants)
    assert [len(b) for b in batches] == [4, 4, 2]  # 7 variants in 3 groups
    assert all(isinstance(b[0], nn.Conv2d) for b in batches)  # each group times the original too
    assert all(t == pytest.approx(original / 2) for t in times.values())  # ratios per group, load cancels


def test_original_layers_are_timed_together_in_groups_scaled_by_a_shared_anchor(monkeypatch):
    from convfactor.auto.latency import model as latency

    base = {}  # true ms of each layer by its out_channels
    calls, sizes = [], []

    def fake(layers, options):  # every group under another load: a factor the anchor must cancel
        calls.append([m.out_channels for m, _ in layers])
        sizes.append(sum(2 * latency._session_bytes(m, shape) for m, shape in layers))
        load = 1.0 + len(calls)
        return [base[m.out_channels] * load for m, _ in layers]

    monkeypatch.setattr(latency, "time_originals_onnxruntime", fake)
    layers = [(nn.Conv2d(8, c, 3), (1, 8, 32 + c, 32 + c)) for c in range(4, 14)]
    for i, (layer, _) in enumerate(layers):
        base[layer.out_channels] = 0.1 * (i + 1)
    per = max(2 * latency._session_bytes(m, s) for m, s in layers)
    monkeypatch.setattr(latency, "TIMING_BYTES", 4 * per)
    model = LatencyModel({"cache": None})
    model.calibrate(layers)
    assert len(calls) >= 3 and all(size <= 4 * per for size in sizes)  # live sessions stay under the bound
    anchor = calls[0][0]
    assert all(c[0] == anchor for c in calls)  # the anchor is timed in every group
    timed = sorted(model.reference.values())
    assert len(timed) == len(layers)
    expected = sorted(v * 2.0 for v in base.values())  # all on the first group's scale (load 2)
    assert timed == pytest.approx(expected, rel=1e-9)
