"""Candidates of each open layer: costs, predicted errors (weight or data-aware) and sensitivities.

Scoring one layer is a function of (layer, its statistics, the options) alone, so layers are scored
independently: serially, on ``AutoOptions.workers`` threads, or as tasks of an ``executor``
(``convfactor.executor``, ``convfactor.auto.tasks``), the results applied in layer order.
Predicted loss of a candidate = sensitivity * error2 (see ``convfactor.auto.resolve``).
"""

from __future__ import annotations

import copy
import math
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import numpy as np
import torch
from torch import nn

from ...costs import replacement_costs
from ...executor import IN_FLIGHT, in_this_process, ordered_results
from ...methods import get_method
from ...methods.base import FactorizationMethod, FactorizedLayer, Rank
from ...progress import track
from ..deadline import Deadline
from ..fits.data_aware import grouped_weight, output_error2
from ..fits.registry import DATA_AWARE_METHODS, FACTORIZERS, layer_factorizer
from ..latency.model import LatencyModel
from ..latency.round_robin import RESOLUTION
from ..options import AutoOptions
from ..statistics.calibration import layer_sensitivities
from ..statistics.split import first_samples
from .candidates import Option, WeightErrors, grouped_bound, grouped_rank, rank_grid
from .depthwise_errors import DepthwiseOutputErrors
from .error_memo import LayerErrors, MemoErrors, MethodErrors
from .plans import Choice, LayerPlan, apply_choices, pass_samples
from .tasks import portable, score_layer_task, sensitivity_task
from .vbmf import VBMF_METHODS, vbmf_layer_rank

__all__ = ["SCORED_RANKS", "build_options", "error_function", "candidate_module", "probe_module",
           "measure_sensitivities"]

# Ranks whose data-aware output error is evaluated per (layer, method) when the layer's statistics are
# reduced (each evaluation costs O*C*K*(C+K)); the others are interpolated.
SCORED_RANKS = 6
ALIGN_CHOICES = (8, 16)  # onnxruntime's CPU conv blocked path works on blocks of 8 or 16 channels


def _ranks_for(plan: LayerPlan, method: FactorizationMethod, opts: AutoOptions) -> list[Rank]:
    extra: list[Rank] = []
    if opts.vbmf and method.name in VBMF_METHODS:
        extra.append(vbmf_layer_rank(method.name, plan.layer))
    align = plan.rule.align
    ranks = rank_grid(method, plan.layer, opts.fractions, align=align, extra_ranks=extra)
    if align is None:
        # Offer the x8- and x16-aligned ranks onnxruntime's blocked path prefers too: measured time decides
        # for a latency target, ``slow_forms.prefer_fast_forms`` under a MACs/params target.
        for each in ALIGN_CHOICES:
            for rank in rank_grid(method, plan.layer, opts.fractions, align=each, extra_ranks=extra):
                if rank not in ranks:
                    ranks.append(rank)
    return ranks


def error_function(plan: LayerPlan, method: FactorizationMethod, stats: Any, factorizers: dict, opts: AutoOptions,
                   signals: dict[str, float] | None = None):
    """rank -> error2 for this layer and method (weight error, or output error on calibration data).

    ``signals``: {layer: E||W p||^2}, filled on first use and read by the layer's other methods (one
    O x D^2 product per layer, not per method)."""
    if stats is None:
        return WeightErrors(method, plan.layer)
    sigma = stats[plan.name].covariance
    groups = plan.layer.groups if hasattr(plan.layer, "groups") else 1
    signals = {} if signals is None else signals

    def signal() -> float:
        if plan.name not in signals:
            signals[plan.name] = sigma.quad(grouped_weight(plan.layer.weight, groups))
        return signals[plan.name]

    factorizer = layer_factorizer(method.name, plan.layer, sigma, opts.damping)
    if factorizer is not None:
        factorizer.signal = signal()
        factorizers[(plan.name, method.name)] = factorizer
        return factorizer.error2
    if sigma.kind != "full":
        # Without data-aware factors the method decomposes the weight; scoring it in the output norm of
        # a large layer costs a decomposition and O*C*K*(C+K) per rank: use its weight error instead.
        plan.notes.append(f"{method.name}: scored by its relative weight error (large layer, reduced statistics)")
        return WeightErrors(method, plan.layer)
    if method.name == "depthwise":  # every multiplier from one SVD and about one quad
        return DepthwiseOutputErrors(plan.layer, sigma, signal())
    weight = grouped_weight(plan.layer.weight, groups)
    bound = grouped_bound(method, plan.layer)
    known = signal()

    def error2(rank: Rank) -> float:
        if bound is not None:  # a large grouped layer: the index-order grouping (refined once if chosen)
            dense = bound.dense(grouped_rank(plan.layer, rank))
        else:
            dense = method.decompose(plan.layer, rank).dense_weight()
        return output_error2(weight, grouped_weight(dense, groups), sigma, known)

    return error2


def _spread(options: list[Option], count: int) -> list[Option]:
    """At most ``count`` options evenly spread over the list (sorted by MACs), keeping both ends."""
    if len(options) <= count:
        return options
    ordered = sorted(options, key=lambda o: (o.macs or 0, o.params))
    picks = sorted({round(i * (len(ordered) - 1) / (count - 1)) for i in range(count)})
    return [ordered[i] for i in picks]


def build_options(plans: list[LayerPlan], kind: str, opts: AutoOptions, stats: Any, model: LatencyModel | None,
                  progress: bool, probe: bool = False, executor: Any = None,
                  memo: dict[str, LayerErrors] | None = None) -> None:
    """Candidates of every open layer with cost and error2; with ``probe``, also each layer's sensitivity
    probe. A layer's data-aware factorizers are dropped once it is scored (memory stays per layer).
    With an ``executor``, each layer's scoring is a task (``tasks.score_layer_task``), applied in layer order.
    With a ``memo`` ({layer: its kept errors}, ``convfactor.auto.selection.error_memo``), kept errors are read
    instead of fitted and the ones computed are added to it."""
    timed = kind == "latency"
    todo = [p for p in plans if p.open]
    costed = {}
    for plan in track(todo, progress, "candidate costs" if timed else "costs"):
        costed[plan.name] = _costed_options(plan, kind, opts, model)
    # Scoring is independent per layer (a function of the layer, its statistics and the options): run
    # it on a thread pool (NumPy and torch release the GIL in their kernels); a distributed engine could
    # take the same calls as tasks.
    workers = max(1, min(opts.workers or 1, len(todo)))
    kept = {p.name: None if memo is None else memo.setdefault(p.name, {}) for p in todo}

    def score(plan: LayerPlan) -> None:
        _score_layer(plan, costed[plan.name], kind, opts, stats, probe, kept[plan.name])

    if executor is not None:
        calls = [(_score_layer, p, costed[p.name], kind, opts, _own_statistics(stats, p.name, executor), probe,
                  kept[p.name]) for p in todo]
        for plan, (options, notes, choice, module, errors) in zip(
                todo, ordered_results(executor, score_layer_task, calls, progress, "candidates", "layer")):
            plan.options, plan.notes, plan.probe = options, notes, module
            if memo is not None:  # a worker process scored its own copy of the layer's kept errors
                memo[plan.name] = errors
            if choice is not None:
                apply_choices([plan], {plan.name: choice})
        return
    if workers == 1:
        for plan in track(todo, progress, "candidates"):
            score(plan)
        return
    with ThreadPoolExecutor(workers) as pool:
        for future in track(as_completed([pool.submit(score, p) for p in todo]), progress, "candidates"):
            future.result()


def _own_statistics(stats: Any, name: str, executor: Any) -> Any:
    """What a scoring task gets of the statistics: all of them in this process, its layer's when pickled."""
    if stats is None or in_this_process(executor):
        return stats
    return {name: stats[name]}


def _costed_options(plan: LayerPlan, kind: str, opts: AutoOptions,
                   model: LatencyModel | None) -> dict[str, list[Option]]:
    """{method: candidate options cheaper than the layer (and measured faster, for latency)} with costs."""
    timed = kind == "latency"
    filter_kind = "macs" if timed or kind == "macs" else "params"
    original_cost = plan.original.cost(filter_kind)
    by_method: dict[str, list[Option]] = {}
    for method in plan.methods:
        kept = []
        for rank in _ranks_for(plan, method, opts):
            macs, params = replacement_costs(method, plan.layer, rank, plan.in_shape)
            option = Option(method.name, rank, None if macs is None else macs * plan.calls, params)
            if option.cost(filter_kind) >= original_cost:
                plan.dropped.append(f"{option.label()}: {filter_kind} >= original")
            else:
                kept.append(option)
        if timed:
            kept = _spread(kept, model.options.max_candidates)
        by_method[method.name] = kept
    if timed:
        variants = [(o.method, o.rank) for kept in by_method.values() for o in kept]
        original_ms, times = model.layer_times(plan.layer, plan.in_shape, variants)
        plan.original.latency_ms = original_ms * plan.calls
        if model.unresolved(plan.layer, plan.in_shape):
            plan.dropped.append(f"the layer alone runs below the timer's resolution ({RESOLUTION:.0%} of its call "
                                "overhead): no replacement can be measured faster")
        for kept in by_method.values():
            for option in kept:
                option.latency_ms = times[(option.method, option.rank)] * plan.calls
        for method_name, kept in by_method.items():
            slower = [o for o in kept if o.latency_ms >= plan.original.latency_ms]
            plan.dropped.extend(f"{o.label()}: measured {o.latency_ms:.4f} ms >= original "
                                f"{plan.original.latency_ms:.4f} ms" for o in slower)
            by_method[method_name] = [o for o in kept if o.latency_ms < plan.original.latency_ms]
    return by_method


def _score_layer(plan: LayerPlan, by_method: dict[str, list[Option]], kind: str, opts: AutoOptions,
                 stats: Any, probe: bool, memo: LayerErrors | None = None) -> LayerErrors | None:
    """Error2 of one layer's options (``plan.options``), and its sensitivity probe when asked. One method's
    data-aware factorizer lives at a time (the probe is built from it while it does), so memory stays at
    one fit of one layer. ``memo``: the layer's kept errors (``error_memo``), read and added to; returned."""
    memo = {} if memo is None else memo
    best: tuple | None = None  # (key of the probe option so far, its module)
    signals: dict[str, float] = {}  # the layer's E||W p||^2, shared by its methods
    for method in plan.methods:
        kept = by_method[method.name]
        if not kept:
            continue
        factorizers: dict = {}
        error2 = _memo_errors(plan, method, stats, factorizers, opts, signals, memo)
        _score(plan, method, kept, error2, stats)
        plan.options.extend(kept)
        if probe:
            option = _probe_option(kept, plan, kind)
            key = _probe_key(option, plan, kind)
            if best is None or key < best[0]:
                best = (key, _probe_builder(plan, method, option, factorizers, stats, opts, signals))
        del factorizers, error2
    if not plan.options:
        why = ("no replacement measured faster than the original layer" if kind == "latency"
               else f"no candidate costs fewer {'macs' if kind != 'params' else 'params'} than the original layer")
        apply_choices([plan], {plan.name: Choice(None, why)})
    elif probe:
        plan.probe = best[1]()
    return memo


def _memo_errors(plan: LayerPlan, method: FactorizationMethod, stats: Any, factorizers: dict, opts: AutoOptions,
                 signals: dict[str, float], memo: LayerErrors) -> MemoErrors:
    """``error_function``'s rank -> error2 behind the layer's kept errors: the function (a factorizer, for a
    data-aware method) is built only when a rank is not kept; the notes it makes are kept with the errors."""
    kept = memo.setdefault(method.name, MethodErrors())
    plan.notes.extend(note for note in kept.notes if note not in plan.notes)

    def build():
        before = len(plan.notes)
        function = error_function(plan, method, stats, factorizers, opts, signals)
        made, plan.notes[before:] = plan.notes[before:], []
        plan.notes.extend(note for note in made if note not in plan.notes)
        kept.notes.extend(note for note in made if note not in kept.notes)
        return function

    return MemoErrors(kept, build)


def _score(plan: LayerPlan, method: FactorizationMethod, options: list[Option], error2, stats: Any) -> None:
    """Set each option's error2. Where one evaluation is expensive (a data-aware fit of a layer with
    reduced statistics), at most SCORED_RANKS ranks spread over the costs are evaluated and the rest
    interpolated (log error, linear in parameters); the chosen rank is fitted exactly later."""
    expensive = stats is not None and stats[plan.name].covariance.kind != "full" and \
        layer_factorizer_exists(method.name)
    if not expensive or len(options) <= SCORED_RANKS:
        for option in options:
            option.error2 = float(error2(option.rank))
        return
    ordered = sorted(options, key=lambda o: o.params)
    picks = sorted({round(i * (len(ordered) - 1) / (SCORED_RANKS - 1)) for i in range(SCORED_RANKS)})
    xs = [float(ordered[i].params) for i in picks]
    ys = [math.log(max(float(error2(ordered[i].rank)), 1e-300)) for i in picks]
    for option in ordered:
        option.error2 = math.exp(float(np.interp(float(option.params), xs, ys)))
    plan.notes.append(f"{method.name}: output error evaluated at {len(picks)} of {len(options)} ranks, "
                      "interpolated between them")


def layer_factorizer_exists(method_name: str) -> bool:
    return method_name in DATA_AWARE_METHODS


def _probe_key(option: Option, plan: LayerPlan, kind: str) -> tuple[float, float]:
    return abs(option.cost(kind) - plan.original.cost(kind) / 2), option.error2


def _probe_option(options: list[Option], plan: LayerPlan, kind: str) -> Option:
    """The candidate nearest half the original cost (the sensitivity probe)."""
    return min(options, key=lambda o: _probe_key(o, plan, kind))


def _probe_builder(plan: LayerPlan, method: FactorizationMethod, option: Option, factorizers: dict, stats: Any,
                   opts: AutoOptions, signals: dict[str, float]):
    """A callable giving the probe module of ``option``. A data-aware probe is built now, while its method's
    factorizer lives; where every rank's error was kept (``error_memo``) and no factorizer was built, one is
    built when the probe is wanted (once every method is scored, so one factorizer lives at a time); a
    weight-only probe (grouped's iterative fit: 20% of ResNet-18's resolution time when every better-so-far
    probe was built) only if it is still the best once every method was scored."""
    if factorizers.get((plan.name, option.method)) is not None:
        module = candidate_module(plan, option, factorizers)
        return lambda: module
    if stats is not None and method.name in FACTORIZERS:

        def build() -> nn.Module:
            fresh: dict = {}
            error_function(plan, method, stats, fresh, opts, signals)
            return candidate_module(plan, option, fresh)

        return build
    return lambda: probe_module(plan, option)


def candidate_module(plan: LayerPlan, option: Option, factorizers: dict) -> FactorizedLayer:
    factorizer = factorizers.get((plan.name, option.method))
    if factorizer is not None:
        return factorizer.module(option.rank)
    return get_method(option.method).decompose(plan.layer, option.rank)


def probe_module(plan: LayerPlan, option: Option) -> nn.Module:
    """The sensitivity probe of a weight-only ``option``: its decomposition, except for a grouped layer too
    large to decompose per rank, which is scored by its index-order grouping (``GroupedBound``) and probed
    with that same weight as a dense copy of the layer. A probe only has to perturb the layer the way its
    error was predicted (the sensitivity is the output error per unit of the probe's own layer error); the
    grouping search and refinement of a real decomposition took a fifth of CRAFT's candidates phase."""
    bound = grouped_bound(get_method(option.method), plan.layer)
    if bound is None:
        return get_method(option.method).decompose(plan.layer, option.rank)
    probe = copy.deepcopy(plan.layer)
    with torch.no_grad():
        probe.weight.copy_(bound.dense(grouped_rank(plan.layer, option.rank)).reshape(probe.weight.shape))
    return probe


def measure_sensitivities(root: nn.Module, plans: list[LayerPlan], kind: str, batches: list, opts: AutoOptions,
                          progress: bool = False, notes: list[str] | None = None, checker: Any = None,
                          deadline: Deadline | None = None, executor: Any = None) -> None:
    """Probe each layer with its candidate nearest half the original cost; sensitivity = output/layer error.

    The original's outputs come from ``checker`` (an ``OutputChecker``) where it holds them; once the
    ``deadline`` is spent, the layers not yet probed get the median sensitivity (and the deadline says so).
    With an ``executor``, the probes are ``IN_FLIGHT`` tasks of consecutive layers (``tasks.sensitivity_task``:
    a traced network's original then runs once per batch per task, not per probe; the deadline is asked once,
    before they are submitted).
    """
    probes, layers = {}, {}
    for plan in plans:
        if not plan.options:
            continue
        probes[plan.name] = plan.probe if plan.probe is not None else \
            probe_module(plan, _probe_option(plan.options, plan, kind))
        plan.probe = None
        layers[plan.name] = plan.layer
    limit = pass_samples(plans, len(probes), opts.sensitivity_samples)
    if limit < opts.sensitivity_samples and notes is not None and sum(len(b[0]) for b in batches) > limit:
        notes.append(f"sensitivities measured on {limit} calibration samples (of {opts.sensitivity_samples} "
                     f"asked): {len(probes)} probes of a large network")
    subset = first_samples(batches, limit)
    reference = checker.reference_for(subset) if checker is not None else None
    if executor is None:
        measured = layer_sensitivities(root, layers, probes, subset, progress, reference=reference,
                                       stop=None if deadline is None else deadline.spent)
    elif deadline is not None and deadline.spent():
        measured = {}
    else:
        shipped = root if in_this_process(executor) else portable(root)
        names = list(probes)
        size = math.ceil(len(names) / IN_FLIGHT) if names else 1  # IN_FLIGHT groups of consecutive layers
        groups = [{n: probes[n] for n in names[i:i + size]} for i in range(0, len(names), size)]
        calls = [(shipped, group, subset, reference) for group in groups]
        measured = {}
        for result in ordered_results(executor, sensitivity_task, calls, progress, "sensitivities", "group"):
            measured.update(result)  # groups in layer order, each in its probes' order
    if len(measured) < len(probes):
        deadline.cut("sensitivity probes", f"stopped after {len(measured)} of {len(probes)} layers (the others "
                     "use the median measured sensitivity)")
    positive = sorted(m["sensitivity"] for m in measured.values() if m["sensitivity"] > 0)
    fallback = positive[len(positive) // 2] if positive else 1.0
    for plan in plans:
        if plan.name in probes:
            value = measured[plan.name]["sensitivity"] if plan.name in measured else 0.0
            # An exact probe (no layer error) says nothing: use the median layer's sensitivity.
            plan.sensitivity = value if value > 0 else fallback
