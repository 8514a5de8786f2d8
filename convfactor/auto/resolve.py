"""Resolve a policy with a target or ``method: auto`` into plain per-layer rules (and data-aware modules).

    layers the rules match -> candidates (method, rank) with cost and predicted loss -> allocation
    -> one exact-name rule per layer (method and concrete rank, or skip)
    [-> fidelity bound / latency target: the budget corrected by measuring whole candidate models, each
        the model the allocation would return (``measured``, ``refit``)]
    [-> with calibration data: data-aware factors, refit in execution order on the partially
        factorized network's activations (``AutoOptions.sequential``)]
    [-> latency: whole-model check, layers dropped until the result is measured faster]

``resolve_policy`` runs the phases of ``convfactor.auto.phases`` in order, each returning a record the next
reads; the report's ``extra['auto']`` is laid out once, from ``ResolutionAccount`` (``account``). The work
itself lives in the sub-packages: ``selection`` (plans, candidates, scoring, allocation, fastest forms),
``search`` (allocation corrected by measurement, the modules an allocation really gets), ``statistics``
and ``fits`` (data-aware), ``latency`` (the cost model). ``AutoOptions.time_budget`` cuts the refinement
phases short (``deadline``).

Predicted loss of a candidate = sensitivity * error2. Without calibration data, error2 is the relative
squared weight error and every sensitivity is 1. With calibration data, error2 is the relative squared
error of the layer's output on the real inputs (data-aware factors where the method has them) and the
sensitivity is measured: the network-output error a probe replacement of that layer causes, per unit
of its own output error. Costs: MACs or parameters exactly as ``convfactor.costs`` counts them, or the
measured onnxruntime time of the layer alone (``convfactor.auto.latency.model``).

Targets: ``{macs: F}`` / ``{params: F}``: the whole model (layers the policy leaves alone count at full
cost) must cost <= F times the original, guaranteed; ``{latency: F}``: predicted by the latency model,
then the whole factorized model is timed against the original and layers are dropped until it is faster.
``method: auto`` without a target picks, per layer, the fastest method at the rule's rank spec among
those measured faster than the original layer.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..fidelity_spec import Fidelity
from ..output_checker import OutputChecker
from ..policy import Policy
from .deadline import Deadline
from .latency.model import LatencyModel
from .latency.options import LatencyOptions
from .layout import Layout, choose_layout, conv_layout
from .options import AutoOptions
from .phases import (
    Data,
    Run,
    allocate_budget,
    build_modules,
    choose_fastest_forms,
    collect_statistics,
    drop_until_faster,
    finish_account,
    plan_open_layers,
    prepare_data,
    read_goal,
    start_account,
    swap_in_fast_forms,
    time_layers,
)
from .search.measured import output_checkers
from .shared import SharedWork
from .statistics.split import DataSplit

__all__ = ["Resolution", "resolve_policy"]


@dataclass
class Resolution:
    """What ``resolve_policy`` decided.

    Attributes:
        policy: plain per-layer rules (exact-name ``match``, concrete method and rank, or skip).
        prebuilt: {layer name: factorized module} with data-aware weights, or None.
        info: JSON-able account of the decision (per layer: chosen option, alternatives, reasons).
        checks: the ``OutputChecker`` of each data part (fit, select, check; ``convfactor.auto.statistics.split``);
            ``convfactor.auto.search.verify.check_result`` measures the final model on ``check``.
        spec: the policy's fidelity declarations (bound, output kinds and slices), or None.
        split: the data's fit / select / check parts (``convfactor.auto.statistics.split``; distillation
            fits on ``fit``).
    """

    policy: Policy
    prebuilt: dict[str, nn.Module] | None
    info: dict[str, Any]
    checks: dict[str, OutputChecker | None] = field(default_factory=dict)
    spec: Fidelity | None = None
    split: DataSplit | None = None


def resolve_policy(
    root: nn.Module,
    policy: Policy | Mapping | str,
    *,
    shapes: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None = None,
    example_inputs: Any = None,
    calibration: Any = None,
    validation: Any = None,
    metric: Any = None,
    latency: Mapping[str, Any] | None = None,
    progress: bool = False,
    options: AutoOptions | None = None,
    latency_model: LatencyModel | None = None,
    distill: Any = None,
    shared: SharedWork | None = None,
    executor: Executor | None = None,
) -> Resolution:
    """Turn a target / ``auto`` policy into plain per-layer rules for ``root``.

    Args:
        root: the (BatchNorm-folded) network about to be factorized; not modified.
        policy: the policy (a ``Policy`` or anything ``Policy.from_any`` takes).
        shapes: {layer: (input shape, output shape)}; computed from the inputs when missing.
        example_inputs: tensor(s) the model runs on: needed for MAC counts and layer input shapes
            (without them, the first calibration sample is used).
        calibration: real inputs (tensor, list of batches, DataLoader) for data-aware factorization; without
            ``validation``, a deterministic eighth of them is held out to select on and another to check
            on (``convfactor.auto.statistics.split``).
        validation: real inputs no fit may see: the search selects on half, the result is checked on the other.
        metric: the user's task metric (``convfactor.metric``), for the report and ``fidelity:`` metric bounds.
        latency: ``LatencyOptions`` mapping, e.g. ``{"threads": 1, "cache": path}``.
        progress: show progress bars.
        options: ``AutoOptions`` (rank grid, methods for auto, damping, ...).
        latency_model: a ready ``LatencyModel`` (tests pass one with stub timers); else built from ``latency``.
        distill: ``DistillOptions`` (``factorize(..., distill=...)``): with a fidelity bound, failing probes of the
            search are judged after a short distillation (``distill_probes``).
        shared: a ``SharedWork`` kept across resolutions of this network on this data (a sweep's points):
            statistics, candidates and sensitivities computed once, reused where nothing they depend on changed.
        executor: a ``concurrent.futures.Executor`` (``convfactor.executor``) the candidate scoring and the
            sensitivity probes are submitted to as tasks; results are reduced in layer order, so the
            allocation is the serial one. None: ``AutoOptions.workers`` threads (default: serial).
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
    run = Run(root, opts, Deadline(opts.time_budget, started), progress, started, shared, executor,
              None if shared is None else shared.network(root))
    if latency_model is None and shared is not None:  # one per latency options across the shared resolutions
        latency_model = shared.latency_model(latency, lambda: LatencyModel(latency))
    policy = Policy.from_any(policy)
    data = prepare_data(run, calibration, validation, example_inputs, shapes, metric)
    goal = read_goal(policy, data)
    plans = plan_open_layers(run, policy, goal, data)
    layout = _layout(root, data, plans, opts, latency, latency_model)
    with conv_layout(root, layout.channels_last):
        stats, outputs = collect_statistics(run, plans, data)
        model, cache_note = time_layers(goal, plans, latency, latency_model)
        account = start_account(data, stats, cache_note, opts)
        if layout.note:
            account.notes.append(layout.note)
        original_metric = None
        if data.metric is not None and shared is not None and data.split.select:
            original_metric = shared.original_metric(run.network, data.metric, lambda: data.metric(root))
        checks = output_checkers(root, data.split, opts, outputs, goal.spec, data.metric, original_metric, shared,
                                 run.network)
        del outputs
        if goal.allocates:
            replacements = allocate_budget(run, plans, goal, data, stats, model, checks, account, distill)
        else:
            replacements = choose_fastest_forms(run, plans, data, stats, model)
        del stats
        speed_model = swap_in_fast_forms(run, plans, goal, data, checks, replacements, account, latency,
                                         latency_model)
        prebuilt = build_modules(run, plans, data, checks, replacements, account, speed_model, goal)
        resolved, prebuilt = drop_until_faster(run, plans, goal, data, model, prebuilt, account)
        finish_account(run, plans, goal, model, account)
    return Resolution(resolved, prebuilt or None, account.to_json(), checks, goal.spec, data.split)


def _layout(root: nn.Module, data: Data, plans: list, opts: AutoOptions, latency: Mapping[str, Any] | None,
            latency_model: LatencyModel | None) -> Layout:
    """The memory layout of this resolution's passes (``convfactor.auto.layout``), timed on one fit sample."""
    sample = tuple(t[:1] for t in data.batches[0]) if data.batches else None
    macs = sum(p.original.macs or 0 for p in plans if p.original is not None) or None
    options = latency_model.options if latency_model is not None else LatencyOptions.from_any(latency)
    return choose_layout(root, sample, macs, opts.layout, options.runtime == "torch")
