"""Candidates' errors are kept across target kinds (``error_memo``), and what is built from them is a lone run's."""

import copy

import pytest
import torch

import convfactor
from convfactor import get_report
from convfactor.auto import AutoOptions
from convfactor.auto.selection.error_memo import MemoErrors, MethodErrors, rank_key
from convfactor.auto.shared import SharedWork
from tests.nets import TinyResNet

# Data-aware methods (their factorizers are what the memo saves) and a grid the two kinds mostly share
METHODS = AutoOptions(auto_methods=("spatial_svd", "tucker2", "svd"), fractions=(0.25, 0.5, 0.75, 1.0),
                      speed_check=False)


def test_memo_serves_kept_ranks_and_builds_the_function_once_on_a_miss():
    built = []

    def build():
        built.append(1)
        return lambda rank: float(rank) / 10

    kept = MethodErrors(errors={2: 0.5})
    memo = MemoErrors(kept, build)
    assert memo(2) == 0.5 and built == [] and memo.function is None  # kept: nothing built
    assert memo(3) == pytest.approx(0.3) and memo(4) == pytest.approx(0.4) and built == [1]
    assert kept.errors == {2: 0.5, 3: pytest.approx(0.3), 4: pytest.approx(0.4)}


def test_a_tucker2_pair_is_one_key_as_a_list_or_a_tuple():
    calls = []
    memo = MemoErrors(MethodErrors(), lambda: (lambda rank: calls.append(rank) or 1.0 / (1 + sum(rank))))
    assert memo([2, 3]) == memo((2, 3)) == pytest.approx(1 / 6) and calls == [[2, 3]]


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return TinyResNet(width=8).eval()


@pytest.fixture(scope="module")
def data():
    return torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _policy(kind, fraction):
    return {"rules": [{"method": "auto"}], "target": {kind: fraction}}


@pytest.fixture
def scored(monkeypatch):
    """Each resolution's exact per-layer sensitivity and candidates' (method, rank, error2), as allocated."""
    import convfactor.auto.resolve as resolve

    seen = []
    real = resolve.allocate_budget

    def spy(run, plans, *args, **kwargs):
        out = real(run, plans, *args, **kwargs)
        seen.append({p.name: (p.sensitivity, [(o.method, str(o.rank), o.error2) for o in p.options])
                     for p in plans if p.options})
        return out

    monkeypatch.setattr(resolve, "allocate_budget", spy)
    return seen


def test_a_second_kind_reuses_the_errors_and_resolves_as_a_lone_run(net, data, scored):
    work = SharedWork()
    convfactor.factorize(net, _policy("params", 0.5), data[:1], calibration=data, auto_options=METHODS, shared=work)
    first = work.counts["candidate errors"]
    shared = convfactor.factorize(net, _policy("macs", 0.5), data[:1], calibration=data, auto_options=METHODS,
                                  shared=work)
    assert work.counts["candidates"] == 2  # each kind scored its own candidates ...
    reused = work.counts["candidate errors"] - first

    alone_work = SharedWork()
    alone = convfactor.factorize(copy.deepcopy(net), _policy("macs", 0.5), data[:1], calibration=data,
                                 auto_options=METHODS, shared=alone_work)
    # ... but fitted only the ranks the params kind had not: far fewer errors than a lone run fits
    assert first > 0 and 0 <= reused < alone_work.counts["candidate errors"] / 2
    # every candidate and its error, every layer's sensitivity: a lone run's to rounding (a factorizer asked
    # other ranks first rounds its products differently), and the same allocation
    assert len(scored) == 3 and scored[1].keys() == scored[2].keys()
    for name, (sensitivity, options) in scored[1].items():
        lone_sensitivity, lone_options = scored[2][name]
        assert sensitivity == pytest.approx(lone_sensitivity, rel=1e-9, abs=0), name
        assert [o[:2] for o in options] == [o[:2] for o in lone_options], name
        assert [o[2] for o in options] == pytest.approx([o[2] for o in lone_options], rel=1e-12, abs=1e-300), name
    a, b = get_report(shared), get_report(alone)
    assert a.policy["resolved"]["rules"] == b.policy["resolved"]["rules"]
    assert a.extra["auto"]["layers"] == b.extra["auto"]["layers"]
    assert a.extra["fidelity_check"]["rel_error"] == b.extra["fidelity_check"]["rel_error"]


def test_kept_errors_are_per_network(net, data):
    work = SharedWork()
    convfactor.factorize(net, _policy("params", 0.5), data[:1], calibration=data, auto_options=METHODS, shared=work)
    first = work.counts["candidate errors"]
    other = copy.deepcopy(net)
    with torch.no_grad():
        next(other.parameters()).mul_(1.5)
    convfactor.factorize(other, _policy("macs", 0.5), data[:1], calibration=data, auto_options=METHODS, shared=work)
    alone = SharedWork()
    convfactor.factorize(other, _policy("macs", 0.5), data[:1], calibration=data, auto_options=METHODS, shared=alone)
    assert work.counts["candidate errors"] - first == alone.counts["candidate errors"]


def _layer():
    from types import SimpleNamespace

    from convfactor.auto.selection.plans import LayerPlan
    from convfactor.auto.statistics.covariance import FullCovariance
    from convfactor.methods import get_method

    torch.manual_seed(0)
    layer = torch.nn.Conv2d(6, 8, 3)
    x = torch.randn(1, 54, 200, dtype=torch.float64)
    stats = {"conv": SimpleNamespace(covariance=FullCovariance(x @ x.transpose(1, 2) / 200))}
    plan = LayerPlan("conv", layer, 0, None)
    plan.methods = [get_method(m) for m in ("spatial_svd", "tucker2", "svd")]
    return plan, stats


RANKS = {"spatial_svd": [2, 3, 5], "tucker2": [(2, 3), (3, 4)], "svd": [2, 3, 5]}


def _options():
    from convfactor.auto.selection.candidates import Option

    return {m: [Option(m, r, 100 * i + 1, 10 * i + 1) for i, r in enumerate(ranks)] for m, ranks in RANKS.items()}


def test_scoring_through_the_memo_gives_each_method_its_own_errors(monkeypatch):
    import convfactor.auto.selection.scoring as scoring
    from convfactor.methods import get_method

    plan, stats = _layer()
    memo = {}
    scoring._score_layer(plan, _options(), "macs", METHODS, stats, False, memo)
    for method, ranks in RANKS.items():  # each method's own error function, rank by rank
        direct = scoring.error_function(plan, get_method(method), stats, {}, METHODS)
        got = {o.rank: o.error2 for o in plan.options if o.method == method}
        assert [got[r] for r in ranks] == pytest.approx([direct(r) for r in ranks], rel=1e-12), method
        assert memo[method].errors == {rank_key(r): got[r] for r in ranks}
    assert len({o.error2 for o in plan.options}) == len(plan.options)  # no method read another's values

    built = []
    real = scoring.layer_factorizer
    monkeypatch.setattr(scoring, "layer_factorizer", lambda name, *a, **k: built.append(name) or real(name, *a, **k))
    kept = {m: MethodErrors(errors={rank_key(r): 1.0 + i for i, r in enumerate(ranks)}) for m, ranks in RANKS.items()}
    del kept["svd"].errors[5]
    again, _ = _layer()
    scoring._score_layer(again, _options(), "macs", METHODS, stats, False, kept)
    errors = {(o.method, o.rank): o.error2 for o in again.options}
    assert errors[("spatial_svd", 5)] == 3.0 and errors[("tucker2", (3, 4))] == 2.0  # kept values read as they are
    assert errors[("svd", 5)] == pytest.approx({o.rank: o.error2 for o in plan.options if o.method == "svd"}[5])
    assert built == ["svd"]  # the one method with a rank not kept fitted it; the others built nothing
