"""A sweep computes statistics, candidates and sensitivities once, and each point is ``factorize`` alone."""

import copy

import torch

import convfactor
import convfactor.auto.phases as resolve
from convfactor import get_report
from tests.sweeps.conftest import FAST

TARGETS = ["macs=0.6,0.45,0.3"]


def _policy(fraction):
    return {"rules": [{"method": "auto"}], "target": {"macs": fraction}}


def test_shared_phases_run_once_and_every_point_is_the_lone_factorize(net, data, monkeypatch):
    counted = {"layer_statistics": 0, "build_options": 0, "measure_sensitivities": 0}
    for name in counted:
        real = getattr(resolve, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            counted[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(resolve, name, spy)
    result = convfactor.sweep(net, TARGETS, data[:1], calibration=data, auto_options=FAST, baseline=None,
                              bench={"skip": True})
    assert counted == {"layer_statistics": 1, "build_options": 1, "measure_sensitivities": 1}
    # the original's outputs on the fit, select and check samples: one pass per part, not per point
    computed = dict(result.shared["computed"])
    assert computed.pop("candidate errors") > 0  # fitted by the one scoring
    assert computed == {"statistics": 1, "candidates": 1, "sensitivities": 1, "reference outputs": 3}
    assert [p.label for p in result.points] == ["macs=0.6", "macs=0.45", "macs=0.3"]

    for point in result.points:
        alone = convfactor.factorize(net, _policy(point.fraction), data[:1], calibration=data, auto_options=FAST)
        report = get_report(alone)
        assert point.allocation == report.policy["resolved"]["rules"], point.label
        swept = get_report(result.models[point.label])
        assert swept.extra["auto"]["layers"] == report.extra["auto"]["layers"], point.label
        assert swept.extra["fidelity_check"]["rel_error"] == report.extra["fidelity_check"]["rel_error"]
    # each lone run computed its own: three more of each phase
    assert counted == {"layer_statistics": 4, "build_options": 4, "measure_sensitivities": 4}
    # cheaper points cost less and lose more, measured on the same held-out samples
    macs = [p.macs_fraction for p in result.points]
    assert macs == sorted(macs, reverse=True) and all(m <= p.fraction + 1e-9 for m, p in zip(macs, result.points))
    assert result.data == "5 held-out calibration samples"


def test_another_model_or_data_set_is_not_served_from_the_shared_work(net, data):
    from convfactor.auto.shared import SharedWork

    work = SharedWork()
    convfactor.factorize(net, _policy(0.5), data[:1], calibration=data, auto_options=FAST, shared=work)
    convfactor.factorize(net, _policy(0.5), data[:1], calibration=data * 0.5, auto_options=FAST, shared=work)
    assert work.counts["statistics"] == 2 and work.counts["candidates"] == 2
    convfactor.factorize(net, _policy(0.4), data[:1], calibration=data, auto_options=FAST, shared=work)
    assert work.counts["statistics"] == 2 and work.counts["candidates"] == 2
    other = copy.deepcopy(net)  # the same architecture, other weights: another network
    with torch.no_grad():
        next(other.parameters()).mul_(1.5)
    convfactor.factorize(other, _policy(0.5), data[:1], calibration=data, auto_options=FAST, shared=work)
    assert work.counts["statistics"] == 3 and work.counts["candidates"] == 3


def test_the_callers_model_keeps_its_mode_and_state(net, data):
    model = copy.deepcopy(net).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convfactor.sweep(model, "macs=0.5", data[:1], calibration=data, auto_options=FAST, baseline=None,
                     bench={"skip": True})
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_original_metric_and_each_points_check_are_evaluated_once(net, data):
    import torch

    from convfactor.metric import as_metric
    from convfactor.sweeps.measure import PointMeter

    calls = []

    def score(module):  # deterministic, so a reused value equals a recomputed one
        calls.append(1)
        with torch.no_grad():
            return float(-module(data[:8]).pow(2).mean())

    result = convfactor.sweep(net, TARGETS, data[:1], calibration=data, metric=score, auto_options=FAST,
                              baseline=None, bench={"skip": True})
    # the original once for the points' selection (shared, and the sweep's own meter reads it), then one
    # final check per point (factorize's, which the sweep reads instead of measuring the point again)
    assert len(calls) == 1 + len(result.points)
    assert result.shared["computed"]["original metric"] == 1
    assert result.metric_original == score(net)
    meter = PointMeter(net, (data[:1],), data, None, as_metric(score), None, None, FAST, None)
    for point in result.points:
        fresh = meter.fidelity(result.models[point.label])
        assert abs(fresh["rel_error"] - point.rel_error) <= 1e-4 * fresh["rel_error"], point.label
        assert abs(fresh["metric"] - point.metric) <= 1e-6 * abs(fresh["metric"]), point.label
        assert fresh["passed"] == point.within_bound


def test_reference_outputs_are_kept_per_network_and_samples_and_not_shipped(net, data):
    import pickle

    from convfactor.auto.shared import SharedWork

    work = SharedWork()
    first = convfactor.factorize(net, _policy(0.5), data[:1], calibration=data, auto_options=FAST, shared=work)
    assert work.counts["reference outputs"] == 3  # fit, select and check samples
    again = convfactor.factorize(net, _policy(0.5), data[:1], calibration=data, auto_options=FAST, shared=work)
    assert work.counts["reference outputs"] == 3
    assert get_report(again).extra["fidelity_check"] == get_report(first).extra["fidelity_check"]
    convfactor.factorize(net, _policy(0.5), data[:1], calibration=data * 0.5, auto_options=FAST, shared=work)
    assert work.counts["reference outputs"] == 6
    assert pickle.loads(pickle.dumps(work))._outputs == {}  # a worker recomputes rather than receive them


def test_the_shared_work_knows_a_network_in_either_memory_layout():
    # Each resolution times its layout (convfactor.auto.layout): one point of a sweep may run its passes
    # channels-last and the next not. A sum over a channels-last weight of this shape rounds differently
    # (CREPE's conv2 computed its statistics twice in a sweep for it).
    import torch

    from convfactor.auto.layout import conv_layout
    from convfactor.auto.shared import _network_key

    net = torch.nn.Sequential(torch.nn.Conv2d(512, 128, (32, 1)))
    weight = net[0].weight.detach()
    weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the reduction's order depends on the threads: 2 rounds this one differently
    try:
        plain = _network_key(net)
        with conv_layout(net, True):
            assert _network_key(net) == plain
    finally:
        torch.set_num_threads(threads)
