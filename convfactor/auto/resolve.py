"""Resolve a policy with a target or ``method: auto`` into plain per-layer rules (and data-aware modules).

    layers the rules match -> candidates (method, rank) with cost and predicted loss -> allocation
    -> one exact-name rule per layer (method and concrete rank, or skip)
    [-> fidelity bound / latency target: the budget corrected by measuring whole candidate models, each
        the model the allocation would return (``measured``, ``refit``)]
    [-> with calibration data: data-aware factors, refit in execution order on the partially
        factorized network's activations (``AutoOptions.sequential``)]
    [-> latency: whole-model check, layers dropped until the result is measured faster]

The steps live in their own modules: ``plans`` (which layers, which methods), ``scoring`` (candidates,
errors, sensitivities), ``measured`` (allocation corrected by measurement), ``refit`` (the modules an
allocation really gets), ``fastest`` (``auto`` without a target), ``outcome`` (rules and the account).
``AutoOptions.time_budget`` cuts the refinement phases short (``deadline``).

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

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from passes.annotate_shapes import layer_io_shapes

from ..batches import calibration_batches, output_leaves
from ..distill.training import as_distill_options
from ..errors import PolicyError
from ..fidelity_spec import Fidelity
from ..inputs import as_input_tuple
from ..metric import as_metric
from ..output_checker import REFERENCE_BYTES, OutputChecker, failures
from ..output_checker import rounded as _round
from ..policy import AUTO, Policy
from ..progress import phase, say
from .latency.model import LatencyModel
from .options import AutoOptions
from .search.budget_search import progress_line
from .search.deadline import Deadline
from .search.distill_probes import ProbeDistiller
from .search.measured import allocation_metrics, measured_allocation, output_checkers
from .search.refit import Replacements
from .search.regularize import regularize
from .selection.fastest import VBMF_RANK, choose_fastest
from .selection.outcome import layer_info, resolved_policy, verify_faster
from .selection.plans import auto_methods as _auto_methods  # noqa: F401 - the name tests and older callers import
from .selection.plans import plan_layers, set_shapes_and_calls
from .selection.scoring import SCORED_RANKS, build_options, measure_sensitivities
from .selection.slow_forms import check_whole_model, flush_denormals, prefer_fast_forms, undo_swaps
from .statistics.calibration import layer_statistics
from .statistics.split import DataSplit, first_samples, split_data

__all__ = ["Resolution", "resolve_policy", "VBMF_RANK", "SCORED_RANKS"]

WEIGHT_BASED = "weight-based selection (no calibration data): error = relative squared weight error, sensitivity 1"
WEIGHT_ONLY_WARNING = (
    "selection was weight-only (no calibration data): the {kind} target was met on the weights' own errors and "
    "the result may not keep accuracy; pass real inputs as calibration=... to factorize (CLI: --calibration "
    "INPUTS.pt) and add a policy fidelity bound (fidelity: {{max_rel_error: 0.05}})")


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
    deadline = Deadline(opts.time_budget, started)
    policy = Policy.from_any(policy)
    inputs = as_input_tuple(example_inputs, allow_none=True)
    batches = None
    if calibration is not None:
        batches = calibration_batches(calibration, len(inputs) if inputs else 1, opts.max_samples, like=inputs)
    if inputs is None and batches is not None:
        inputs = tuple(t[:1] for t in batches[0])  # one calibration sample stands in for example_inputs
    held = None
    if validation is not None:
        held = calibration_batches(validation, len(inputs) if inputs else 1, opts.max_samples, like=inputs)
    split = split_data(batches, held, inputs)
    batches = split.fit  # every fit, refit and probe sees these only
    metric = as_metric(metric)
    shapes = dict(shapes or {})
    if not shapes and inputs is not None:
        shapes = layer_io_shapes(root, inputs)
    target = policy.target
    spec = policy.fidelity
    bound = policy.bound
    if bound is not None and bound.needs_metric and metric is None:
        raise PolicyError("policy: fidelity max_metric_drop/min_metric need the task metric: pass metric=... to "
                          "factorize (CLI: --metric MODULE:FUNCTION)")
    timed = (target is not None and target[0] == "latency") or (
        target is None and bound is None and any(r.method == AUTO for r in policy.rules))
    notes: list[str] = []

    plans = plan_layers(root, policy, opts)
    open_plans = [p for p in plans if p.open]
    if (target is not None and target[0] == "macs" or timed) and any(p.name not in shapes for p in open_plans):
        what = "a macs target" if not timed else "latency measurement"
        raise PolicyError(f"{what} needs example_inputs (the layers' input shapes and MAC counts)")
    set_shapes_and_calls(root, plans, shapes, inputs)

    stats, outputs = None, []
    if batches is not None:
        layers = {p.name: p.layer for p in open_plans}
        stats = layer_statistics(root, layers, batches, opts.max_rows, opts.seed, opts.memory_budget, progress,
                                 on_output=_keep_outputs(batches, opts, outputs)) if layers else {}
    model = None
    if timed:
        model = latency_model or LatencyModel(latency)
        if model.cache.load_error:
            notes.append(model.cache.load_error)
        if target is not None:  # a latency target weighs layers against each other: time them together
            model.calibrate([(p.layer, p.in_shape) for p in open_plans if p.in_shape is not None])

    info: dict[str, Any] = {
        "selection": WEIGHT_BASED if batches is None else
        f"data-aware selection and factorization ({sum(len(b[0]) for b in batches)} calibration samples fit): "
        "error = relative squared layer-output error on the fit samples, sensitivity measured"
        + ("" if opts.sensitivity else " (disabled: 1.0)"),
        "notes": notes,
        "warnings": [],  # accuracy
        "speed_warnings": [],  # speed and cost
        "data_split": split.describe(),
    }
    notes.extend(split.notes)
    if stats:
        reduced = {name: st.covariance.describe() for name, st in stats.items() if st.covariance.kind != "full"}
        if reduced:
            info["statistics"] = {"memory_budget": int(opts.memory_budget), "layers": reduced}

    checks = output_checkers(root, split, opts, outputs, spec, metric)
    checker = checks["select"]  # every measurement a decision is made by
    del outputs
    kind = None
    forms = {name: st.covariance.kind for name, st in (stats or {}).items()}
    if target is not None or bound is not None:
        kind, fraction = target if target is not None else ("macs" if inputs is not None else "params", None)
        build_options(plans, kind, opts, stats, model, progress, probe=batches is not None and opts.sensitivity)
        scoring = {p.name: sorted(set(p.notes)) for p in plans if p.notes}
        if scoring:
            info.setdefault("statistics", {})["scoring"] = scoring
        if batches is not None and opts.sensitivity:
            measure_sensitivities(root, plans, kind, batches, opts, progress, notes, checks["fit"] or checker,
                                  deadline)
        for plan in open_plans:
            for option in plan.options:
                option.loss = plan.sensitivity * option.error2
        if batches is not None and opts.sequential:
            stats = None  # the sequential refit collects its own statistics, layer by layer
        replacements = Replacements(root, plans, opts, batches=batches, inputs=inputs, stats=stats, forms=forms,
                                    deadline=deadline)
        prober, distill = None, as_distill_options(distill)
        if distill is not None and distill.probes and bound is not None and batches and checker is not None:
            prober = ProbeDistiller(root, batches, checker, distill, progress)
        with phase(progress, "allocation", total=1) as bar:
            info["target"], search = measured_allocation(root, plans, kind, fraction, bound, inputs, opts, model,
                                                          checker, replacements, notes, deadline,
                                                          on_probe=lambda p: bar.set_postfix(**probe_postfix(p)),
                                                          measure=prober.measure if prober else None)
            bar.update()
        if search is not None:
            info["search"] = search
            if prober is not None:
                search["distilled_probes"] = prober.describe()
        ignored = sorted({p.rule_index + 1 for p in open_plans if p.rule.rank is not None or p.rule.energy is not None})
        if ignored:
            notes.append(f"rule(s) {', '.join(map(str, ignored))}: rank/energy ignored, the target allocates ranks")
    else:
        choose_fastest(plans, opts, stats, model, progress)
        replacements = Replacements(root, plans, opts, batches=batches, inputs=inputs, stats=stats, forms=forms,
                                    deadline=deadline)
    if batches is None and target is not None and target[0] in ("macs", "latency"):
        info["warnings"].append(WEIGHT_ONLY_WARNING.format(kind=target[0]))
    speed_model = None
    if kind in ("macs", "params") and opts.speed_check and inputs is not None:
        speed_model = latency_model or LatencyModel(latency)
        _speed_check(root, open_plans, kind, bound, checker, replacements, info, speed_model, inputs)

    prebuilt = replacements.build(progress)  # a probe's modules when the search measured this allocation
    if replacements.sequential or replacements.stats is not None:
        prebuilt, account = regularize(root, plans, opts, replacements, prebuilt, checks, notes, deadline, progress)
        if account is not None:
            info["regularization"] = account
    flushed = sum(flush_denormals(module) for module in (prebuilt or {}).values())
    if flushed:
        notes.append(f"{flushed} denormal weights of the data-aware factors set to 0 (they run many times slower)")
    if "speed_check" in info:  # the network as the caller gets it: these weights, denormals flushed
        try:
            info["speed_check"]["whole_model"] = check_whole_model(root, open_plans, speed_model, inputs,
                                                                   info["speed_warnings"], modules=prebuilt)
        except Exception as exc:  # noqa: BLE001 - timing is advice here, never a reason to fail
            notes.append(f"whole-network speed check skipped: {type(exc).__name__}: {exc}")
    stats = None
    if replacements.sequential and prebuilt:
        info["selection"] += "; factors refit sequentially on the partially factorized network's activations"
        if replacements.used < sum(len(b[0]) for b in batches):
            notes.append(f"sequential refit on the first {replacements.used} calibration samples (a large network)")
    if replacements.weight_only:
        notes.append(f"{len(replacements.weight_only)} layer(s) decomposed from their weights after the time "
                     f"budget ran out: {', '.join(sorted(replacements.weight_only))}")
    resolved = resolved_policy(plans, keep_only_if_cheaper=target is None)
    if model is not None and model.options.verify and inputs is not None:
        # A latency target was corrected by measurement above; dropping layers remains the last resort
        # for `auto` rules and for a result still measured slower than the original.
        droppable = [p for p in plans if p.chosen is not None and (target is not None or p.rule.method == AUTO)]
        last = (info.get("search") or {}).get("probes", [{}])[-1]
        if target is None or not last.get("measured") or last.get("fraction", 2.0) >= 1.0:
            resolved, prebuilt, info["verification"] = verify_faster(root, plans, droppable, resolved, prebuilt,
                                                                     shapes, inputs, model)
    if model is not None:
        info["latency"] = {"runtime": model.options.runtime, "device": model.options.device,
                           "threads": model.options.threads, "cache": str(model.cache.path),
                           "measured_variants": model.measured}
    info["layers"] = {p.name: layer_info(p, target[0] if target else "latency") for p in plans
                      if p.rule is not None}
    info["predicted_loss"] = _round(sum(p.chosen.loss for p in plans if p.chosen is not None))
    if bound is not None:
        info["fidelity_bound"] = bound.to_dict()
    search = info.get("search")
    if search is not None:
        if search.get("missed"):
            info["speed_warnings"].append(search["missed"]["message"])
        search["share"] = progress_line(search["checks"], time.perf_counter() - started)
        if progress:
            say(search["share"])
    for warning in deadline.warnings:  # a cut latency correction costs speed; any other cut, accuracy
        info["speed_warnings" if "latency correction" in warning else "warnings"].append(warning)
    if opts.time_budget is not None:
        info["time_budget"] = {"seconds": opts.time_budget, "used": round(deadline.elapsed(), 2),
                               "cut": [w.split(": ", 1)[1] for w in deadline.warnings]}
    return Resolution(resolved, prebuilt or None, info, checks, spec, split)


def probe_postfix(probe: Any) -> dict[str, str]:
    """What the allocation's progress shows of a probe: its cost, held-out error and metric."""
    shown = {"cost": f"{probe.fraction:.3f}"}
    if probe.metrics is not None:
        shown["error"] = f"{probe.metrics['rel_error']:.3g}"
        if "metric" in probe.metrics:
            shown["metric"] = f"{probe.metrics['metric']:.4g}"
    return shown


def _keep_outputs(batches: list, opts: AutoOptions, outputs: list) -> Any:
    """A ``layer_statistics`` callback keeping the original's outputs on the fidelity checks' batches."""
    checked = first_samples(batches, opts.fidelity_samples)
    held = [0]

    def keep(index: int, output: Any) -> None:
        if index != len(outputs) or index >= len(checked) or len(checked[index][0]) != len(batches[index][0]) \
                or held[0] > REFERENCE_BYTES:
            return
        leaves = output_leaves(output)
        held[0] += sum(t.numel() * 4 for t in leaves)
        outputs.append(leaves)

    return keep


def _speed_check(root: nn.Module, open_plans: list, kind: str, bound: Any, checker: OutputChecker | None,
                 replacements: Replacements, info: dict[str, Any], model: LatencyModel, inputs: Any) -> None:
    """Prefer chosen forms that run fast (``slow_forms``); undo the swaps when they break the bound. (The
    whole network is timed after the factors are built: ``check_whole_model`` with the result's modules.)"""
    notes = info["notes"]
    try:
        info["speed_check"] = prefer_fast_forms(open_plans, kind, model, info["speed_warnings"])
        if info["speed_check"]["swapped"] and bound is not None and checker is not None \
                and failures(allocation_metrics(root, open_plans, replacements, checker, bound), bound):
            undo_swaps(info["speed_check"])
            notes.append("faster forms of similar predicted error were not kept: the model then failed "
                         "the fidelity bound")
        info["speed_check"].pop("undo", None)
        if info["speed_check"]["swapped"]:  # a swap never costs more; the account follows it exactly
            account = info["target"]
            predicted = account["fixed"] + math.fsum(p.original.cost(kind) if p.chosen is None
                                                     else p.chosen.cost(kind) for p in open_plans)
            account["predicted"] = int(round(predicted))
            account["predicted_fraction"] = _round(predicted / account["original"])
    except Exception as exc:  # noqa: BLE001 - timing is advice here, never a reason to fail
        notes.append(f"speed check of the chosen forms skipped: {type(exc).__name__}: {exc}")
