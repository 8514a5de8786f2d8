"""The sweep's reductions: Pareto front, the best point within the bound, the baseline's rank search, a metric."""

import pytest

import convfactor
from convfactor.errors import ConvfactorError
from convfactor.sweeps import SweepPoint, pareto_front, parse_targets
from convfactor.sweeps.points import uniform_rank
from tests.sweeps.conftest import FAST


def _point(label, speedup, error, metric=None, baseline=False, within=True):
    return SweepPoint(label=label, kind="macs", fraction=0.5, baseline=baseline, macs_fraction=0.5,
                      params_fraction=0.5, rel_error=error, worst="0", outputs=[], within_bound=within,
                      metric=metric, speedup=speedup, speedup_p10=speedup, speedup_p90=speedup, reliable=True)


def test_the_front_keeps_what_nothing_beats_on_both_speed_and_quality():
    points = [_point("a", 1.2, 0.05), _point("b", 1.5, 0.10), _point("c", 1.4, 0.20), _point("d", 2.0, 0.30)]
    assert [points[i].label for i in pareto_front(points, None)] == ["a", "b", "d"]
    # with a metric, quality is the metric in its direction, not the error
    points = [_point("a", 1.2, 0.05, metric=0.90), _point("b", 1.5, 0.10, metric=0.95)]
    assert [points[i].label for i in pareto_front(points, True)] == ["b"]
    assert [points[i].label for i in pareto_front(points, False)] == ["a", "b"]


def test_targets_parse_in_order_and_refuse_what_a_policy_would():
    assert [t.label for t in parse_targets(["macs=0.7,0.5", "latency=0.8"])] == ["macs=0.7", "macs=0.5", "latency=0.8"]
    for bad in (["macs=1"], ["macs="], ["flops=0.5"], [], ["macs=0.5,0.5"]):
        with pytest.raises(ConvfactorError):
            parse_targets(bad)


def test_the_uniform_rank_is_the_largest_tried_within_the_macs_point():
    def macs(rank):  # a step function, as integer ranks make it
        return min(1.0, round(rank * 8) / 8 + 0.05)

    rank, got = uniform_rank(macs, 0.5)  # 0.425 is the most within 0.5: ranks below 7/16
    assert got == pytest.approx(0.425) and got == macs(rank) and rank < 7 / 16
    rank, got = uniform_rank(lambda r: 0.9, 0.5)  # never reached: the cheapest tried, said by its MACs
    assert got == 0.9


def test_a_metric_bound_picks_the_fastest_point_that_keeps_it(net, data):
    def agreement(model):
        return float((model(data).argmax(1) == net(data).argmax(1)).float().mean())

    result = convfactor.sweep(net, "macs=0.8,0.3", data[:1], calibration=data, auto_options=FAST, baseline=None,
                              bench={"skip": True}, metric=agreement,
                              policy={"rules": [{"method": "auto"}], "fidelity": {"max_metric_drop": 0.2}})
    assert result.metric_name == "agreement" and result.metric_original == 1.0
    assert all(p.metric is not None and p.metric_drop == pytest.approx(1.0 - p.metric) for p in result.points)
    kept = [p for p in result.points if p.metric_drop <= 0.2 + 1e-12]
    assert [p.within_bound for p in result.points] == [p in kept for p in result.points]
    best = result.best()
    assert (best is None) == (not kept)
    if kept:  # untimed: the fewest MACs among the points within the bound
        assert best.macs_fraction == min(p.macs_fraction for p in kept)
    assert "metric agreement: original 1" in result.table()
