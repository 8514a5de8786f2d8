"""Resolve a policy with a target or ``method: auto`` into plain per-layer rules (and data-aware modules).

    layers the rules match -> candidates (method, rank) with cost and predicted loss -> allocation
    -> one exact-name rule per layer (method and concrete rank, or skip)
    [-> with calibration data: data-aware factors, refit in execution order on the partially
        factorized network's activations (``AutoOptions.sequential``)]
    [-> latency: whole-model check, layers dropped until the result is measured faster]

Predicted loss of a candidate = sensitivity * error2. Without calibration data, error2 is the relative
squared weight error and every sensitivity is 1. With calibration data, error2 is the relative squared
error of the layer's output on the real inputs (data-aware factors where the method has them) and the
sensitivity is measured: the network-output error a probe replacement of that layer causes, per unit
of its own output error. Costs: MACs or parameters exactly as ``convfactor.costs`` counts them, or the
measured onnxruntime time of the layer alone (``convfactor.auto.latency``).

Targets: ``{macs: F}`` / ``{params: F}``: the whole model (layers the policy leaves alone count at full
cost) must cost <= F times the original, guaranteed; ``{latency: F}``: predicted by the latency model,
then the whole factorized model is timed against the original and layers are dropped until it is faster.
``method: auto`` without a target picks, per layer, the fastest method at the rule's rank spec among
those measured faster than the original layer.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from passes.annotate_shapes import layer_io_shapes
from passes.factorize_layers import blocked_layers

from ..costs import count_params, layer_macs, per_layer_macs
from ..decisions import apply_policy as factorize_layers  # the factorize_layers pass, driven by a policy
from ..decisions import candidate_layers, describe_shape
from ..errors import PolicyError, RankError
from ..geometry import layer_kind
from ..methods import available_methods, get_method
from ..methods.base import FactorizationMethod, FactorizedLayer, Rank
from ..policy import AUTO, SKIP, Policy, Rule
from ..progress import phase, track
from .calibration import (
    calibration_batches,
    execution_order,
    layer_sensitivities,
    layer_statistics,
    paired_statistics,
)
from .candidates import Option, WeightErrors, grouped_bound, rank_grid, rank_to_json, replacement_costs
from .data_aware import DATA_AWARE_METHODS, corrected_weight, grouped_weight, layer_factorizer, output_error2
from .latency import LatencyModel
from .measured import candidate_metrics, first_samples, measured_allocation, output_checker, tighten_after_refit
from .measured import rounded as _round
from .options import OPT_IN_METHODS, SLOW_METHODS, AutoOptions
from .slow_forms import check_whole_model, flush_denormals, prefer_fast_forms, undo_swaps
from .vbmf import VBMF_METHODS, vbmf_layer_rank
from .verify import (
    OutputChecker,
    failures,
    progress_line,
    say,
)

__all__ = ["Resolution", "resolve_policy", "VBMF_RANK", "SCORED_RANKS"]

# Ranks whose data-aware output error is evaluated per (layer, method) when the layer's statistics are
# reduced (each evaluation costs O*C*K*(C+K)); the others are interpolated.
SCORED_RANKS = 6
# Network MACs the sensitivity probes and the sequential refit may each spend (a few minutes on 2 cores;
# the shipped digits models stay far below it): each uses at most that many calibration samples (but at
# least _MIN_PASS_SAMPLES).
PASS_MACS = 5e11
_MIN_PASS_SAMPLES = 16

# A rule's ``rank: vbmf`` asks for the VBMF estimate (needs the policy change described in the report).
VBMF_RANK = "vbmf"
WEIGHT_BASED = "weight-based selection (no calibration data): error = relative squared weight error, sensitivity 1"
WEIGHT_ONLY_WARNING = (
    "selection was weight-only (no calibration data): the {kind} target was met on the weights' own errors and "
    "the result may not keep accuracy; pass real inputs as calibration=... to factorize (CLI: --calibration "
    "INPUTS.pt) and add a policy fidelity bound (fidelity: {{max_rel_error: 0.05}})")
_ALIGN_CHOICES = (8, 16)  # alignments ``method: auto`` without a target times beside the exact rank


@dataclass
class Resolution:
    """What ``resolve_policy`` decided.

    Attributes:
        policy: plain per-layer rules (exact-name ``match``, concrete method and rank, or skip).
        prebuilt: {layer name: factorized module} with data-aware weights, or None.
        info: JSON-able account of the decision (per layer: chosen option, alternatives, reasons).
        checker: measures a factorized model against the original on the calibration (else example)
            inputs; ``convfactor.auto.verify.check_result`` applies it to the final model.
    """

    policy: Policy
    prebuilt: dict[str, FactorizedLayer] | None
    info: dict[str, Any]
    checker: OutputChecker | None = None  # the original's outputs on the data at hand (the fidelity floor)


@dataclass
class _LayerPlan:
    name: str
    layer: nn.Module
    rule_index: int | None
    rule: Rule | None
    methods: list[FactorizationMethod] = field(default_factory=list)
    reason: str | None = None  # why the layer is not open to a decision
    in_shape: tuple[int, ...] | None = None
    calls: int = 1
    original: Option | None = None
    options: list[Option] = field(default_factory=list)  # replacements still in the running
    dropped: list[str] = field(default_factory=list)  # short notes on options removed
    sensitivity: float = 1.0
    chosen: Option | None = None
    decision: str | None = None  # why the chosen option was chosen / the layer was left
    probe: nn.Module | None = None  # the replacement probed for the sensitivity (calibration data only)
    notes: list[str] = field(default_factory=list)  # how the candidates were scored, where it is not exact

    @property
    def open(self) -> bool:
        return self.reason is None and bool(self.methods)


def _as_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...] | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def resolve_policy(
    root: nn.Module,
    policy: Policy | Mapping | str,
    *,
    shapes: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None = None,
    example_inputs: Any = None,
    calibration: Any = None,
    latency: Mapping[str, Any] | None = None,
    progress: bool = False,
    options: AutoOptions | None = None,
    latency_model: LatencyModel | None = None,
) -> Resolution:
    """Turn a target / ``auto`` policy into plain per-layer rules for ``root``.

    Args:
        root: the (BatchNorm-folded) network about to be factorized; not modified.
        policy: the policy (a ``Policy`` or anything ``Policy.from_any`` takes).
        shapes: {layer: (input shape, output shape)}; computed from the inputs when missing.
        example_inputs: tensor(s) the model runs on: needed for MAC counts and layer input shapes
            (without them, the first calibration sample is used).
        calibration: real inputs (tensor, list of batches, DataLoader) for data-aware factorization.
        latency: ``LatencyOptions`` mapping, e.g. ``{"threads": 1, "cache": path}``.
        progress: show progress bars.
        options: ``AutoOptions`` (rank grid, methods for auto, damping, ...).
        latency_model: a ready ``LatencyModel`` (tests pass one with stub timers); else built from ``latency``.
    Returns:
        A ``Resolution``.
    Raises:
        PolicyError: a target that cannot be met, or information the policy needs is missing.

    Example:
        >>> res = resolve_policy(root, {"rules": [{"types": ["Conv2d"], "method": "auto"}],
        ...                             "target": {"macs": 0.5}}, example_inputs=x)
        >>> res.policy.rules[0].to_dict()
        {'match': 'conv1', 'method': 'spatial_svd', 'rank': 12}
    """
    started = time.perf_counter()
    opts = options or AutoOptions()
    policy = Policy.from_any(policy)
    inputs = _as_inputs(example_inputs)
    batches = None
    if calibration is not None:
        batches = calibration_batches(calibration, len(inputs) if inputs else 1, opts.max_samples, like=inputs)
    if inputs is None and batches is not None:
        inputs = tuple(t[:1] for t in batches[0])  # one calibration sample stands in for example_inputs
    shapes = dict(shapes or {})
    if not shapes and inputs is not None:
        shapes = layer_io_shapes(root, inputs)
    target = policy.target
    bound = policy.fidelity
    timed = (target is not None and target[0] == "latency") or (
        target is None and bound is None and any(r.method == AUTO for r in policy.rules))
    notes: list[str] = []

    plans = _plan_layers(root, policy, opts)
    open_plans = [p for p in plans if p.open]
    if (target is not None and target[0] == "macs" or timed) and any(p.name not in shapes for p in open_plans):
        what = "a macs target" if not timed else "latency measurement"
        raise PolicyError(f"{what} needs example_inputs (the layers' input shapes and MAC counts)")
    _set_shapes_and_calls(root, plans, shapes, inputs)

    stats = None
    if batches is not None:
        layers = {p.name: p.layer for p in plans if p.open}
        stats = layer_statistics(root, layers, batches, opts.max_rows, opts.seed, opts.memory_budget,
                                 progress) if layers else {}
    model = None
    if timed:
        model = latency_model or LatencyModel(latency)
        if model.cache.load_error:
            notes.append(model.cache.load_error)
        if target is not None:  # a latency target weighs layers against each other: time them together
            model.calibrate([(p.layer, p.in_shape) for p in open_plans if p.in_shape is not None])

    info: dict[str, Any] = {
        "selection": WEIGHT_BASED if batches is None else
        f"data-aware selection and factorization ({sum(len(b[0]) for b in batches)} calibration samples): "
        "error = relative squared layer-output error on the calibration inputs, sensitivity measured"
        + ("" if opts.sensitivity else " (disabled: 1.0)"),
        "notes": notes,
        "warnings": [],
    }
    if stats:
        reduced = {name: st.covariance.describe() for name, st in stats.items() if st.covariance.kind != "full"}
        if reduced:
            info["statistics"] = {"memory_budget": int(opts.memory_budget), "layers": reduced}
    prebuilt: dict[str, FactorizedLayer] = {}
    factorizers: dict[tuple[str, str], Any] = {}

    checker = output_checker(root, batches, inputs, opts)
    kind = None
    if target is not None or bound is not None:
        kind, fraction = target if target is not None else ("macs" if inputs is not None else "params", None)
        _build_options(plans, kind, opts, stats, factorizers, model, progress,
                       probe=batches is not None and opts.sensitivity)
        scoring = {p.name: sorted(set(p.notes)) for p in plans if p.notes}
        if scoring:
            info.setdefault("statistics", {})["scoring"] = scoring
        if batches is not None and opts.sensitivity:
            _measure_sensitivities(root, plans, kind, stats, factorizers, batches, opts, progress, notes)
        for plan in open_plans:
            for option in plan.options:
                option.loss = plan.sensitivity * option.error2
        with phase(progress, "allocation", total=1) as bar:
            info["target"], search = measured_allocation(root, plans, kind, fraction, bound, inputs, opts, model,
                                                          checker, factorizers, notes, progress)
            bar.update()
        if search is not None:
            info["search"] = search
        ignored = sorted({p.rule_index + 1 for p in open_plans if p.rule.rank is not None or p.rule.energy is not None})
        if ignored:
            notes.append(f"rule(s) {', '.join(map(str, ignored))}: rank/energy ignored, the target allocates ranks")
    else:
        _choose_fastest(plans, opts, stats, factorizers, model, progress)
    if batches is None and target is not None and target[0] in ("macs", "latency"):
        info["warnings"].append(WEIGHT_ONLY_WARNING.format(kind=target[0]))
    if kind in ("macs", "params") and opts.speed_check and inputs is not None:
        try:
            speed_model = latency_model or LatencyModel(latency)
            info["speed_check"] = prefer_fast_forms(open_plans, kind, speed_model, info["warnings"])
            if info["speed_check"]["swapped"] and bound is not None and checker is not None \
                    and failures(candidate_metrics(root, open_plans, factorizers, checker, bound), bound):
                undo_swaps(info["speed_check"])
                notes.append("faster forms of similar predicted error were not kept: the model then failed "
                             "the fidelity bound")
            info["speed_check"].pop("undo", None)
            info["speed_check"]["whole_model"] = check_whole_model(root, open_plans, speed_model, inputs,
                                                                   info["warnings"])
            if info["speed_check"]["swapped"]:  # a swap never costs more; the account follows it exactly
                account = info["target"]
                predicted = account["fixed"] + math.fsum(p.original.cost(kind) if p.chosen is None
                                                         else p.chosen.cost(kind) for p in open_plans)
                account["predicted"] = int(round(predicted))
                account["predicted_fraction"] = _round(predicted / account["original"])
        except Exception as exc:  # noqa: BLE001 - timing is advice here, never a reason to fail
            notes.append(f"speed check of the chosen forms skipped: {type(exc).__name__}: {exc}")

    if batches is not None and opts.sequential:
        forms = {name: st.covariance.kind for name, st in stats.items()}
        stats = None  # the refit collects its own statistics, layer by layer
        factorizers.clear()
        used = _build_prebuilt_sequentially(root, plans, batches, inputs, opts, prebuilt, forms, progress)
        info["selection"] += "; factors refit sequentially on the partially factorized network's activations"
        if used is not None and used < sum(len(b[0]) for b in batches):
            notes.append(f"sequential refit on the first {used} calibration samples (a large network)")
        rerun = (info.get("search") or {}).pop("_rerun", None)
        if rerun is not None and not info["search"]["probes"][0]["fidelity_ok"]:  # the bound cost budget
            prebuilt = tighten_after_refit(root, plans, batches, inputs, opts, prebuilt, checker, bound, rerun, info)
    else:
        _build_prebuilt(plans, stats, factorizers, opts, prebuilt)
    flushed = sum(flush_denormals(module) for module in prebuilt.values())
    if flushed:
        notes.append(f"{flushed} denormal weights of the data-aware factors set to 0 (they run many times slower)")
    resolved = _resolved_policy(plans, keep_only_if_cheaper=target is None)
    if model is not None and model.options.verify and inputs is not None:
        # A latency target was corrected by measurement above; dropping layers remains the last resort
        # for `auto` rules and for a result still measured slower than the original.
        droppable = [p for p in plans if p.chosen is not None and (target is not None or p.rule.method == AUTO)]
        last = (info.get("search") or {}).get("probes", [{}])[-1]
        if target is None or not last.get("measured") or last.get("fraction", 2.0) >= 1.0:
            resolved, prebuilt, info["verification"] = _verify_faster(root, plans, droppable, resolved, prebuilt,
                                                                      shapes, inputs, model)
    if model is not None:
        info["latency"] = {"runtime": model.options.runtime, "device": model.options.device,
                           "threads": model.options.threads, "cache": str(model.cache.path),
                           "measured_variants": model.measured}
    info["layers"] = {p.name: _layer_info(p, target[0] if target else "latency") for p in plans
                      if p.rule is not None}
    info["predicted_loss"] = _round(sum(p.chosen.loss for p in plans if p.chosen is not None))
    if bound is not None:
        info["fidelity_bound"] = bound.to_dict()
    search = info.get("search")
    if search is not None:
        search.pop("_rerun", None)
        if search.get("missed"):
            info["warnings"].append(search["missed"]["message"])
        search["share"] = progress_line(search["checks"], time.perf_counter() - started)
        if progress:
            say(search["share"])
    return Resolution(resolved, prebuilt or None, info, checker)


# -- which layers, which methods -------------------------------------------------------------------


def _auto_methods(opts: AutoOptions) -> list[str]:
    if opts.auto_methods is not None:
        return list(opts.auto_methods)
    return [m for m in available_methods() if m not in SLOW_METHODS + OPT_IN_METHODS]


def _plan_layers(root: nn.Module, policy: Policy, opts: AutoOptions) -> list[_LayerPlan]:
    blocked = blocked_layers(root)
    plans = []
    for name, layer in candidate_layers(root):
        found = policy.rule_for(name, layer_kind(layer))
        plan = _LayerPlan(name, layer, None if found is None else found[0], None if found is None else found[1])
        plans.append(plan)
        if found is None:
            plan.reason = "no policy rule matches"
            continue
        rule = plan.rule
        if rule.method == SKIP:
            plan.reason = f"rule {plan.rule_index + 1}: skip"
            continue
        names = _auto_methods(opts) if rule.method == AUTO else [rule.method]
        reasons = []
        for method_name in names:
            method = get_method(method_name)
            why = method.unsupported_reason(layer)
            if why is None:
                plan.methods.append(method)
            else:
                reasons.append(why if why.startswith(method_name) else f"{method_name}: {why}")
        if name in blocked:
            plan.reason = blocked[name]
        elif not plan.methods:
            joined = "; ".join(reasons)
            plan.reason = joined if rule.method != AUTO else f"no method can represent it: {joined}"
    return plans


def _set_shapes_and_calls(root: nn.Module, plans: list[_LayerPlan], shapes: Mapping, inputs: Any) -> None:
    totals = per_layer_macs(root, inputs) if inputs is not None else {}
    for plan in plans:
        in_out = shapes.get(plan.name)
        macs = None
        if in_out is not None:
            plan.in_shape = tuple(in_out[0])
            single = layer_macs(plan.layer, in_out[1])
            macs = totals.get(plan.name, single)
            plan.calls = max(1, round(macs / single)) if single else 1
        plan.original = Option(None, None, macs, count_params(plan.layer))


# -- candidates ------------------------------------------------------------------------------------


def _ranks_for(plan: _LayerPlan, method: FactorizationMethod, opts: AutoOptions, timed: bool) -> list[Rank]:
    extra: list[Rank] = []
    if opts.vbmf and method.name in VBMF_METHODS:
        extra.append(vbmf_layer_rank(method.name, plan.layer))
    align = plan.rule.align
    ranks = rank_grid(method, plan.layer, opts.fractions, align=align, extra_ranks=extra)
    if align is None:
        # Offer the x8- and x16-aligned ranks onnxruntime's blocked path prefers too: measured time decides
        # for a latency target, ``slow_forms.prefer_fast_forms`` under a MACs/params target.
        for each in _ALIGN_CHOICES:
            for rank in rank_grid(method, plan.layer, opts.fractions, align=each, extra_ranks=extra):
                if rank not in ranks:
                    ranks.append(rank)
    return ranks


def _error_function(plan: _LayerPlan, method: FactorizationMethod, stats: Any, factorizers: dict, opts: AutoOptions):
    """rank -> error2 for this layer and method (weight error, or output error on calibration data)."""
    if stats is None:
        return WeightErrors(method, plan.layer)
    sigma = stats[plan.name].covariance
    factorizer = layer_factorizer(method.name, plan.layer, sigma, opts.damping)
    if factorizer is not None:
        factorizers[(plan.name, method.name)] = factorizer
        return factorizer.error2
    if sigma.kind != "full":
        # Without data-aware factors the method decomposes the weight; scoring it in the output norm of
        # a large layer costs a decomposition and O*C*K*(C+K) per rank: use its weight error instead.
        plan.notes.append(f"{method.name}: scored by its relative weight error (large layer, reduced statistics)")
        return WeightErrors(method, plan.layer)
    groups = plan.layer.groups if hasattr(plan.layer, "groups") else 1
    weight = grouped_weight(plan.layer.weight, groups)
    bound = grouped_bound(method, plan.layer)

    def error2(rank: Rank) -> float:
        if bound is not None:  # a large grouped layer: the index-order grouping (refined once if chosen)
            full = (plan.layer.in_channels, plan.layer.out_channels)
            dense = bound.dense((rank, *full) if isinstance(rank, int) else tuple(rank))
        else:
            dense = method.decompose(plan.layer, rank).dense_weight()
        return output_error2(weight, grouped_weight(dense, groups), sigma)

    return error2


def _spread(options: list[Option], count: int) -> list[Option]:
    """At most ``count`` options evenly spread over the list (sorted by MACs), keeping both ends."""
    if len(options) <= count:
        return options
    ordered = sorted(options, key=lambda o: (o.macs or 0, o.params))
    picks = sorted({round(i * (len(ordered) - 1) / (count - 1)) for i in range(count)})
    return [ordered[i] for i in picks]


def _build_options(plans: list[_LayerPlan], kind: str, opts: AutoOptions, stats: Any, factorizers: dict,
                   model: LatencyModel | None, progress: bool, probe: bool = False) -> None:
    """Candidates of every open layer with cost and error2; with ``probe``, also each layer's sensitivity
    probe. A layer's data-aware factorizers are dropped once it is scored (memory stays per layer)."""
    timed = kind == "latency"
    todo = [p for p in plans if p.open]
    costed = {}
    for plan in track(todo, progress, "candidate costs" if timed else "costs"):
        costed[plan.name] = _costed_options(plan, kind, opts, model)
    # Scoring is independent per layer (a function of the layer, its statistics and the options): run
    # it on a thread pool (NumPy and torch release the GIL in their kernels); a distributed engine could
    # take the same calls as tasks.
    workers = max(1, min(opts.workers or 1, len(todo)))

    def score(plan: _LayerPlan) -> None:
        _score_layer(plan, costed[plan.name], kind, opts, stats, probe)

    if workers == 1:
        for plan in track(todo, progress, "candidates"):
            score(plan)
        return
    with ThreadPoolExecutor(workers) as pool:
        for future in track(as_completed([pool.submit(score, p) for p in todo]), progress, "candidates"):
            future.result()


def _costed_options(plan: _LayerPlan, kind: str, opts: AutoOptions,
                    model: LatencyModel | None) -> dict[str, list[Option]]:
    """{method: candidate options cheaper than the layer (and measured faster, for latency)} with costs."""
    timed = kind == "latency"
    filter_kind = "macs" if timed or kind == "macs" else "params"
    original_cost = plan.original.cost(filter_kind)
    by_method: dict[str, list[Option]] = {}
    for method in plan.methods:
        kept = []
        for rank in _ranks_for(plan, method, opts, timed):
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
        for kept in by_method.values():
            for option in kept:
                option.latency_ms = times[(option.method, option.rank)] * plan.calls
        for method_name, kept in by_method.items():
            slower = [o for o in kept if o.latency_ms >= plan.original.latency_ms]
            plan.dropped.extend(f"{o.label()}: measured {o.latency_ms:.4f} ms >= original "
                                f"{plan.original.latency_ms:.4f} ms" for o in slower)
            by_method[method_name] = [o for o in kept if o.latency_ms < plan.original.latency_ms]
    return by_method


def _score_layer(plan: _LayerPlan, by_method: dict[str, list[Option]], kind: str, opts: AutoOptions,
                 stats: Any, probe: bool) -> None:
    """Error2 of one layer's options (``plan.options``), and its sensitivity probe when asked. Its
    data-aware factorizers live only here, so memory stays per layer."""
    factorizers: dict = {}
    for method in plan.methods:
        kept = by_method[method.name]
        if not kept:
            continue
        error2 = _error_function(plan, method, stats, factorizers, opts)
        _score(plan, method, kept, error2, stats)
        plan.options.extend(kept)
    if not plan.options:
        plan.decision = ("no replacement measured faster than the original layer" if kind == "latency"
                         else f"no candidate costs fewer {'macs' if kind != 'params' else 'params'} "
                         "than the original layer")
    elif probe:
        plan.probe = _candidate_module(plan, _probe_option(plan, kind), factorizers)


def _score(plan: _LayerPlan, method: FactorizationMethod, options: list[Option], error2, stats: Any) -> None:
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


def _pass_samples(plans: list[_LayerPlan], passes: int, wanted: int) -> int:
    """Samples for ``passes`` forward passes of the network within PASS_MACS (at least _MIN_PASS_SAMPLES)."""
    per_sample = sum(p.original.macs or 0 for p in plans if p.original is not None)
    if per_sample <= 0 or passes <= 0:
        return wanted
    return int(min(wanted, max(_MIN_PASS_SAMPLES, PASS_MACS // (passes * per_sample))))


def _probe_option(plan: _LayerPlan, kind: str) -> Option:
    """The candidate nearest half the original cost (the sensitivity probe)."""
    half = plan.original.cost(kind) / 2
    return min(plan.options, key=lambda o: (abs(o.cost(kind) - half), o.error2))


def _candidate_module(plan: _LayerPlan, option: Option, factorizers: dict) -> FactorizedLayer:
    factorizer = factorizers.get((plan.name, option.method))
    if factorizer is not None:
        return factorizer.module(option.rank)
    return get_method(option.method).decompose(plan.layer, option.rank)


def _measure_sensitivities(root: nn.Module, plans: list[_LayerPlan], kind: str, stats: Any, factorizers: dict,
                           batches: list, opts: AutoOptions, progress: bool = False,
                           notes: list[str] | None = None) -> None:
    """Probe each layer with its candidate nearest half the original cost; sensitivity = output/layer error."""
    probes, layers = {}, {}
    for plan in plans:
        if not plan.options:
            continue
        probes[plan.name] = plan.probe if plan.probe is not None else \
            _candidate_module(plan, _probe_option(plan, kind), factorizers)
        plan.probe = None
        layers[plan.name] = plan.layer
    limit = _pass_samples(plans, len(probes), opts.sensitivity_samples)
    if limit < opts.sensitivity_samples and notes is not None and sum(len(b[0]) for b in batches) > limit:
        notes.append(f"sensitivities measured on {limit} calibration samples (of {opts.sensitivity_samples} "
                     f"asked): {len(probes)} probes of a large network")
    measured = layer_sensitivities(root, layers, probes, first_samples(batches, limit), progress)
    positive = sorted(m["sensitivity"] for m in measured.values() if m["sensitivity"] > 0)
    fallback = positive[len(positive) // 2] if positive else 1.0
    for plan in plans:
        if plan.name in measured:
            value = measured[plan.name]["sensitivity"]
            # An exact probe (no layer error) says nothing: use the median layer's sensitivity.
            plan.sensitivity = value if value > 0 else fallback


# -- allocation ------------------------------------------------------------------------------------


# -- auto without a target -------------------------------------------------------------------------


def _rule_rank(plan: _LayerPlan, method: FactorizationMethod) -> Rank:
    rule = plan.rule
    if rule.rank == VBMF_RANK:
        rank = vbmf_layer_rank(method.name, plan.layer)
        return method.resolve_rank(plan.layer, rank=rank_to_json(rank), align=rule.align)
    return method.resolve_rank(plan.layer, rank=rule.rank, energy=rule.energy, align=rule.align)


def _choose_fastest(plans: list[_LayerPlan], opts: AutoOptions, stats: Any, factorizers: dict,
                    model: LatencyModel | None, progress: bool) -> None:
    for plan in track([p for p in plans if p.open], progress, "methods"):
        rule = plan.rule
        if rule.method != AUTO:
            try:
                rank = _rule_rank(plan, plan.methods[0])
            except RankError as exc:
                raise RankError(f"{rule.describe(plan.rule_index)}, layer {plan.name!r}: {exc}") from None
            macs, params = replacement_costs(plan.methods[0], plan.layer, rank, plan.in_shape)
            plan.chosen = Option(rule.method, rank, None if macs is None else macs * plan.calls, params)
            plan.decision = f"rule {plan.rule_index + 1}"
            continue
        if rule.rank is None and rule.energy is None:
            raise PolicyError(f"{rule.describe(plan.rule_index)}: method 'auto' without a target needs a rank "
                              "spec (e.g. energy: 0.9) or a policy target (e.g. target: {latency: 0.7})")
        candidates = []
        for method in plan.methods:
            try:
                rank = _rule_rank(plan, method)
            except RankError as exc:  # e.g. rank: vbmf for a method VBMF does not apply to
                plan.dropped.append(f"{method.name}: {exc}")
                continue
            ranks = [rank]
            if rule.align is None:
                # Measured time decides the alignment too: the rank rounded up to onnxruntime's channel
                # blocks (x8, x16) keeps at least the rule's accuracy and often runs faster.
                for align in _ALIGN_CHOICES:
                    aligned = method.resolve_rank(plan.layer, rank=rank_to_json(rank), align=align)
                    if aligned not in ranks:
                        ranks.append(aligned)
            for each in ranks:
                macs, params = replacement_costs(method, plan.layer, each, plan.in_shape)
                candidates.append(Option(method.name, each, None if macs is None else macs * plan.calls, params))
        if not candidates:
            plan.decision = "no method resolves the rule's rank spec for this layer"
            continue
        original_ms, times = model.layer_times(plan.layer, plan.in_shape, [(o.method, o.rank) for o in candidates])
        plan.original.latency_ms = original_ms * plan.calls
        for option in candidates:
            option.latency_ms = times[(option.method, option.rank)] * plan.calls
            errors = _error_function(plan, get_method(option.method), stats, factorizers, opts)
            option.error2 = float(errors(option.rank))
            option.loss = option.error2
        plan.options = candidates
        faster = [o for o in candidates if o.latency_ms < plan.original.latency_ms]
        plan.dropped += [f"{o.label()}: measured {o.latency_ms:.4f} ms >= original {plan.original.latency_ms:.4f} ms"
                        for o in candidates if o not in faster]
        if faster:
            plan.chosen = min(faster, key=lambda o: (o.latency_ms, o.error2))
            plan.decision = "the fastest measured method at the rule's rank spec (or its x8/x16 rounding up)"
        else:
            plan.decision = "no method at the rule's rank spec measured faster than the original layer"


# -- results ---------------------------------------------------------------------------------------


def _build_prebuilt(plans: list[_LayerPlan], stats: Any, factorizers: dict, opts: AutoOptions,
                    prebuilt: dict[str, FactorizedLayer]) -> None:
    if stats is None:
        return
    for plan in plans:
        option = plan.chosen
        if option is None or plan.name not in stats:
            continue
        factorizer = factorizers.get((plan.name, option.method))
        if factorizer is None:
            factorizer = layer_factorizer(option.method, plan.layer, stats[plan.name].covariance, opts.damping)
        if factorizer is not None:
            prebuilt[plan.name] = factorizer.module(option.rank)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _build_prebuilt_sequentially(root: nn.Module, plans: list[_LayerPlan], batches: list, inputs: tuple,
                                 opts: AutoOptions, prebuilt: dict[str, FactorizedLayer],
                                 forms: dict[str, str] | None = None, progress: bool = False) -> int | None:
    """Factorize the chosen layers in execution order, each fitted on the inputs the network now gives it.

    A working copy of ``root`` receives every replacement as it is made; the next layer's target is the
    original network's output of that layer, its inputs those of the working copy (``corrected_weight``).
    Methods without data-aware factors are decomposed from the weight and installed all the same.
    """
    chosen = {p.name: p for p in plans if p.chosen is not None}
    if not chosen:
        return None
    work = copy.deepcopy(root)
    # Each refit runs both networks up to its layer (about one full pass per layer in all).
    used = _pass_samples(plans, len(chosen), sum(len(b[0]) for b in batches))
    batches = first_samples(batches, used)
    for name in track(execution_order(root, list(chosen), inputs), progress, "refit"):
        plan = chosen[name]
        option = plan.chosen
        form = (forms or {}).get(name, "full")
        sigma, cross = paired_statistics(root, work, name, batches, opts.max_rows, opts.seed, form)
        groups = getattr(plan.layer, "groups", 1)
        weight = corrected_weight(grouped_weight(plan.layer.weight, groups), sigma, cross, opts.damping)
        factorizer = layer_factorizer(option.method, plan.layer, sigma, opts.damping, weight=weight)
        if factorizer is None:
            module = get_method(option.method).decompose(plan.layer, option.rank)
        else:
            module = prebuilt[name] = factorizer.module(option.rank)
        _set_submodule(work, name, copy.deepcopy(module))
    return used


def _resolved_policy(plans: list[_LayerPlan], keep_only_if_cheaper: bool = False) -> Policy:
    rules = []
    for plan in plans:
        if plan.rule is None:
            continue
        if plan.chosen is not None:
            # Without a target the user's only_if_cheaper still holds (with one, skipping could break it).
            cheaper = keep_only_if_cheaper and plan.rule.only_if_cheaper
            rules.append(Rule(method=plan.chosen.method, match=plan.name, only_if_cheaper=cheaper,
                              rank=plan.chosen.rank if isinstance(plan.chosen.rank, (int, tuple)) else None))
        elif plan.rule.method not in (SKIP, AUTO) and plan.reason is not None:
            # factorize_layers reports the method's own reason (unsupported, tied weights) for this layer.
            rules.append(Rule(method=plan.rule.method, match=plan.name))
        else:
            rules.append(Rule(method=SKIP, match=plan.name))
    if not rules:
        rules.append(Rule(method=SKIP, match="*"))
    return Policy(tuple(rules))


def _verify_faster(root: nn.Module, plans: list[_LayerPlan], chosen: list[_LayerPlan], resolved: Policy,
                   prebuilt: dict, shapes: Mapping, inputs: tuple,
                   model: LatencyModel) -> tuple[Policy, dict, dict[str, Any]]:
    """Time the factorized model against the original; drop layers of ``chosen`` until it is faster.

    Layers are dropped smallest predicted saving first, 1, 2, 4, ... at a time (keeping at least one while
    rounds remain); when the rounds run out and it is still not faster, every layer of ``chosen`` is left
    as is, so the result is never measured slower than the original.
    """
    # Smallest predicted saving first: those are the layers most likely to lose to fusion and overhead.
    order = sorted(chosen, key=lambda p: (p.original.latency_ms or 0) - (p.chosen.latency_ms or 0))
    rounds = []
    dropped: list[_LayerPlan] = []
    step = 1
    while True:
        if not chosen or len(dropped) == len(chosen):
            rounds.append({"dropped": len(dropped), "speedup": None})
            break
        candidate = copy.deepcopy(root)
        factorize_layers(candidate, resolved, shapes, prebuilt={k: copy.deepcopy(v) for k, v in prebuilt.items()})
        speedup = float(model.speedup(root, candidate, inputs))
        rounds.append({"dropped": len(dropped), "speedup": _round(speedup)})
        if speedup > 1.0 or len(rounds) >= model.options.verify_rounds:
            if speedup <= 1.0:
                dropped = list(chosen)  # out of rounds and still not faster: leave every layer as is
            break
        # Drop 1, 2, 4, ... more, but keep at least one layer while rounds remain (a final all-drop follows).
        take = max(1, min(step, len(chosen) - len(dropped) - 1))
        dropped.extend(order[len(dropped): len(dropped) + take])
        step *= 2
        for plan in dropped:
            if plan.chosen is not None:
                plan.decision = ("dropped after the whole factorized model was not faster than the original "
                                 f"(measured {speedup:.3f}x)")
                plan.chosen = None
        prebuilt = {k: v for k, v in prebuilt.items() if k not in {p.name for p in dropped}}
        resolved = _resolved_policy(plans)
    for plan in dropped:
        if plan.chosen is not None:
            plan.decision = "dropped: the factorized model was never measured faster than the original"
            plan.chosen = None
    prebuilt = {k: v for k, v in prebuilt.items() if k not in {p.name for p in dropped}}
    return _resolved_policy(plans), prebuilt, {"rounds": rounds, "layers_dropped": [p.name for p in dropped]}


def _option_info(option: Option, original: Option, kind: str) -> dict[str, Any]:
    out = {"method": option.method, "rank": rank_to_json(option.rank), "macs": option.macs,
           "params": option.params, "error2": _round(option.error2), "loss": _round(option.loss)}
    if option.latency_ms is not None:
        out["latency_ms"] = _round(option.latency_ms, 4)
    base = original.cost(kind) if _has_cost(original, kind) else None
    if base:
        out["cost_fraction"] = _round(option.cost(kind) / base, 4)
    return out


def _has_cost(option: Option, kind: str) -> bool:
    return {"macs": option.macs, "params": option.params, "latency": option.latency_ms}[kind] is not None


def _layer_info(plan: _LayerPlan, kind: str) -> dict[str, Any]:
    out: dict[str, Any] = {"shape": describe_shape(plan.layer), "rule": plan.rule_index + 1,
                           "methods": [m.name for m in plan.methods]}
    if plan.reason is not None:
        out["chosen"] = None
        out["reason"] = plan.reason
        return out
    original = plan.original
    out["original"] = {"macs": original.macs, "params": original.params}
    if original.latency_ms is not None:
        out["original"]["latency_ms"] = _round(original.latency_ms, 4)
    out["sensitivity"] = _round(plan.sensitivity)
    out["chosen"] = None if plan.chosen is None else _option_info(plan.chosen, original, kind)
    if plan.decision:
        out["reason" if plan.chosen is None else "why"] = plan.decision
    cost_kind = kind if _has_cost(original, kind) else "params"
    base = original.cost(cost_kind) or 1.0
    # Compact alternatives: [method, rank, cost as a fraction of the original, predicted loss].
    out["options"] = [[o.method, rank_to_json(o.rank), _round(o.cost(cost_kind) / base, 4), _round(o.loss, 4)]
                      for o in sorted(plan.options, key=lambda o: (o.method, o.cost(cost_kind)))]
    if plan.dropped:
        out["dropped"] = len(plan.dropped)
        out["dropped_examples"] = plan.dropped[:3]
    return out
