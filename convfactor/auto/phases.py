"""The phases of ``resolve_policy``, in the order it runs them, and the records they pass.

    prepare_data        the user's data -> fit/select/check batches, layer shapes, the metric   (Data)
    read_goal           the policy -> its target, fidelity bound, and whether layers are timed (Goal)
    plan_open_layers    which layers are open, with which methods, at what original cost        (LayerPlan)
    collect_statistics  per-layer input statistics on the fit data; the original's outputs kept
    time_layers         the latency model, when layers are timed
    start_account       what the report says so far                                            (ResolutionAccount)
    allocate_budget     with a target or bound: candidates scored, budget allocated and measured
    choose_fastest_forms  ``method: auto`` alone: each layer's fastest form
    swap_in_fast_forms  under a MACs/params budget: faster forms of similar error swapped in
    build_modules       the modules the result gets (refit, regularized, denormals flushed)
    drop_until_faster   the plain rules; timed layers dropped until the whole model is faster
    finish_account      the per-layer account, the search's summary and what a time budget cut

Each phase takes what it reads and returns what it made; ``Run`` holds what all of them share.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from torch import nn

from passes.annotate_shapes import layer_io_shapes

from ..batches import calibration_batches, output_leaves
from ..distill.training import as_distill_options
from ..errors import PolicyError
from ..fidelity_spec import Fidelity
from ..inputs import as_input_tuple
from ..metric import Metric, as_metric
from ..output_checker import REFERENCE_BYTES, OutputChecker, failures
from ..output_checker import rounded as _round
from ..policy import AUTO, Policy
from ..progress import phase, say
from .account import ResolutionAccount
from .deadline import Deadline
from .latency.model import LatencyModel
from .options import AutoOptions
from .search.budget_search import progress_line
from .search.distill_probes import ProbeDistiller
from .search.measured import allocation_metrics, measured_allocation
from .search.refit import Replacements
from .search.regularize import regularize
from .selection.fastest import choose_fastest
from .selection.outcome import layer_info, resolved_policy, verify_faster
from .selection.plans import Choice, LayerPlan, apply_choices, plan_layers, set_shapes_and_calls
from .selection.scoring import build_options, measure_sensitivities
from .selection.slow_forms import check_whole_model, flush_denormals, prefer_fast_forms
from .shared import SharedWork
from .statistics.calibration import layer_statistics
from .statistics.split import DataSplit, first_samples, split_data

__all__ = ["Run", "Data", "Goal", "prepare_data", "read_goal", "plan_open_layers", "collect_statistics",
           "time_layers", "start_account", "allocate_budget", "choose_fastest_forms", "swap_in_fast_forms",
           "build_modules", "drop_until_faster", "finish_account", "probe_postfix"]

WEIGHT_BASED = "weight-based selection (no calibration data): error = relative squared weight error, sensitivity 1"
WEIGHT_ONLY_WARNING = (
    "selection was weight-only (no calibration data): the {kind} target was met on the weights' own errors and "
    "the result may not keep accuracy; pass real inputs as calibration=... to factorize (CLI: --calibration "
    "INPUTS.pt) and add a policy fidelity bound (fidelity: {{max_rel_error: 0.05}})")


@dataclass(frozen=True)
class Run:
    """What every phase of one resolution shares: the network, the options, the clock and the progress flag;
    the work kept across resolutions (``SharedWork``) and where tasks run (an executor), when given."""

    root: nn.Module
    opts: AutoOptions
    deadline: Deadline
    progress: bool
    started: float
    shared: SharedWork | None = None
    executor: Executor | None = None
    network: tuple | None = None  # ``SharedWork.network(root)`` when ``shared`` is given: its lookups' key


@dataclass(frozen=True)
class Data:
    """The data a resolution works on: example inputs, the fit/select/check split, layer shapes, the metric."""

    inputs: tuple | None
    split: DataSplit
    shapes: dict[str, tuple[Sequence[int], Sequence[int]]]
    metric: Metric | None

    @property
    def batches(self) -> list | None:
        """The fit part: every fit, refit and probe sees these only."""
        return self.split.fit


@dataclass(frozen=True)
class Goal:
    """What the policy asks for: a target, a fidelity bound, or per-layer ``auto`` choices timed."""

    target: tuple[str, float] | None
    bound: Fidelity | None
    spec: Fidelity | None
    timed: bool  # layers are timed: a latency target, or ``auto`` rules without target or bound

    @property
    def allocates(self) -> bool:
        """A budget (target or fidelity bound) is allocated; else each layer takes its fastest form."""
        return self.target is not None or self.bound is not None


def prepare_data(run: Run, calibration: Any, validation: Any, example_inputs: Any, shapes: Any,
                  metric: Any) -> Data:
    """Batches from the user's data, split into fit/select/check; layer shapes from the inputs when missing."""
    opts = run.opts
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
    metric = as_metric(metric)
    shapes = dict(shapes or {})
    if not shapes and inputs is not None:
        shapes = layer_io_shapes(run.root, inputs)
    return Data(inputs, split, shapes, metric)


def read_goal(policy: Policy, data: Data) -> Goal:
    """The policy's target and bound; a bound on the task metric needs the metric."""
    target, bound = policy.target, policy.bound
    if bound is not None and bound.needs_metric and data.metric is None:
        raise PolicyError("policy: fidelity max_metric_drop/min_metric need the task metric: pass metric=... to "
                          "factorize (CLI: --metric MODULE:FUNCTION)")
    timed = (target is not None and target[0] == "latency") or (
        target is None and bound is None and any(r.method == AUTO for r in policy.rules))
    return Goal(target, bound, policy.fidelity, timed)


def plan_open_layers(run: Run, policy: Policy, goal: Goal, data: Data) -> list[LayerPlan]:
    """Which layers are open to a decision, with which methods, at what original cost."""
    plans = plan_layers(run.root, policy, run.opts)
    needs_shapes = goal.target is not None and goal.target[0] == "macs" or goal.timed
    if needs_shapes and any(p.name not in data.shapes for p in plans if p.open):
        what = "a macs target" if not goal.timed else "latency measurement"
        raise PolicyError(f"{what} needs example_inputs (the layers' input shapes and MAC counts)")
    set_shapes_and_calls(run.root, plans, data.shapes, data.inputs)
    return plans


def collect_statistics(run: Run, plans: list[LayerPlan], data: Data) -> tuple[dict | None, list]:
    """Per-layer input statistics on the fit data (None without data), and the original's outputs kept on
    the fidelity checks' batches while the statistics pass runs the network anyway."""
    outputs: list = []
    if data.batches is None:
        return None, outputs
    opts = run.opts
    layers = {p.name: p.layer for p in plans if p.open}
    if not layers:
        return {}, outputs
    keep = _keep_outputs(data.batches, opts, outputs)

    def collect() -> dict:
        return layer_statistics(run.root, layers, data.batches, opts.max_rows, opts.seed, opts.memory_budget,
                                run.progress, on_output=keep)

    stats = collect() if run.shared is None else run.shared.statistics(run.network, layers, data.batches, opts, collect)
    return stats, outputs


def time_layers(goal: Goal, plans: list[LayerPlan], latency: Any,
                   latency_model: LatencyModel | None) -> tuple[LatencyModel | None, str | None]:
    """The latency model when layers are timed (with its cache's load error, if any), else None."""
    if not goal.timed:
        return None, None
    model = latency_model or LatencyModel(latency)
    if goal.target is not None:  # a latency target weighs layers against each other: time them together
        model.calibrate([(p.layer, p.in_shape) for p in plans if p.open and p.in_shape is not None])
    return model, model.cache.load_error or None


def start_account(data: Data, stats: dict | None, cache_note: str | None, opts: AutoOptions) -> ResolutionAccount:
    """The account as the data and statistics leave it: how candidates are scored, the split, reduced forms."""
    batches = data.batches
    selection = WEIGHT_BASED if batches is None else (
        f"data-aware selection and factorization ({sum(len(b[0]) for b in batches)} calibration samples fit): "
        "error = relative squared layer-output error on the fit samples, sensitivity measured"
        + ("" if opts.sensitivity else " (disabled: 1.0)"))
    account = ResolutionAccount(selection, data.split.describe(), notes=[cache_note] if cache_note else [])
    account.notes.extend(data.split.notes)
    reduced = {name: st.covariance.describe() for name, st in (stats or {}).items() if st.covariance.kind != "full"}
    if reduced:
        account.statistics = {"memory_budget": int(opts.memory_budget), "layers": reduced}
    return account


def allocate_budget(run: Run, plans: list[LayerPlan], goal: Goal, data: Data, stats: dict | None,
              model: LatencyModel | None, checks: dict[str, OutputChecker | None], account: ResolutionAccount,
              distill: Any) -> Replacements:
    """Score every candidate, measure sensitivities, allocate the budget and correct it by measurement."""
    root, opts, batches, notes = run.root, run.opts, data.batches, account.notes
    kind, fraction = goal.target if goal.target is not None else ("macs" if data.inputs is not None else "params", None)
    open_plans = [p for p in plans if p.open]
    checker = checks["select"]  # every measurement a decision is made by

    def score(memo: dict | None = None) -> bool:  # False: a deadline cut the probes short (then not kept)
        build_options(plans, kind, opts, stats, model, run.progress, probe=batches is not None and opts.sensitivity,
                      executor=run.executor, memo=memo)
        if batches is None or not opts.sensitivity:
            return True
        cuts = len(run.deadline.warnings)
        measure_sensitivities(root, plans, kind, batches, opts, run.progress, notes, checks["fit"] or checker,
                              run.deadline, executor=run.executor)
        return len(run.deadline.warnings) == cuts

    if run.shared is None:
        score()
    else:
        run.shared.scored(run.network, plans, kind, batches, opts, model.options if model is not None else None, notes,
                          score)
    scoring = {p.name: sorted(set(p.notes)) for p in plans if p.notes}
    if scoring:
        account.statistics = {**(account.statistics or {}), "scoring": scoring}
    for plan in open_plans:
        for option in plan.options:
            option.loss = plan.sensitivity * option.error2
    forms = {name: st.covariance.kind for name, st in (stats or {}).items()}
    sequential = batches is not None and opts.sequential  # the sequential refit collects its own statistics
    replacements = Replacements(root, plans, opts, batches=batches, inputs=data.inputs,
                                stats=None if sequential else stats, forms=forms, deadline=run.deadline)
    prober, distill = None, as_distill_options(distill)
    if distill is not None and distill.probes and goal.bound is not None and batches and checker is not None:
        prober = ProbeDistiller(root, batches, checker, distill, run.progress)
    with phase(run.progress, "allocation", total=1) as bar:
        account.target, account.search = measured_allocation(
            root, plans, kind, fraction, goal.bound, data.inputs, opts, model, checker, replacements, notes,
            run.deadline, on_probe=lambda p: bar.set_postfix(**probe_postfix(p)),
            measure=prober.measure if prober else None)
        bar.update()
    if account.search is not None and prober is not None:
        account.search["distilled_probes"] = prober.describe()
    ignored = sorted({p.rule_index + 1 for p in open_plans if p.rule.rank is not None or p.rule.energy is not None})
    if ignored:
        notes.append(f"rule(s) {', '.join(map(str, ignored))}: rank/energy ignored, the target allocates ranks")
    if batches is None and goal.target is not None and goal.target[0] in ("macs", "latency"):
        account.warnings.append(WEIGHT_ONLY_WARNING.format(kind=goal.target[0]))
    return replacements


def choose_fastest_forms(run: Run, plans: list[LayerPlan], data: Data, stats: dict | None,
                    model: LatencyModel | None) -> Replacements:
    """``method: auto`` without a target or bound: each layer's fastest form at its rule's rank spec."""
    apply_choices(plans, choose_fastest(plans, run.opts, stats, model, run.progress))
    forms = {name: st.covariance.kind for name, st in (stats or {}).items()}
    return Replacements(run.root, plans, run.opts, batches=data.batches, inputs=data.inputs, stats=stats,
                        forms=forms, deadline=run.deadline)


def swap_in_fast_forms(run: Run, plans: list[LayerPlan], goal: Goal, data: Data,
                       checks: dict[str, OutputChecker | None], replacements: Replacements,
                       account: ResolutionAccount, latency: Any,
                       latency_model: LatencyModel | None) -> LatencyModel | None:
    """Under a MACs/params budget, prefer chosen forms that run fast (``slow_forms``); undo the swaps when they
    break the bound. Returns the latency model used (the whole network is timed after the build), or None."""
    kind = goal.target[0] if goal.target is not None else ("macs" if data.inputs is not None else "params")
    if not goal.allocates or kind not in ("macs", "params") or not run.opts.speed_check or data.inputs is None:
        return None
    model = latency_model or LatencyModel(latency)
    open_plans = [p for p in plans if p.open]
    checker = checks["select"]
    try:
        check, swaps = prefer_fast_forms(open_plans, kind, model, account.speed_warnings)
        account.speed_check = check
        before = {p.name: Choice(p.chosen, p.decision) for p in open_plans if p.name in swaps}
        apply_choices(open_plans, swaps)
        if check["swapped"] and goal.bound is not None and checker is not None and failures(
                allocation_metrics(run.root, open_plans, replacements, checker, goal.bound), goal.bound):
            apply_choices(open_plans, before)
            check["swapped"] = []
            account.notes.append("faster forms of similar predicted error were not kept: the model then failed "
                                 "the fidelity bound")
        if check["swapped"]:  # a swap never costs more; the account follows it exactly
            target = account.target
            predicted = target["fixed"] + math.fsum(p.original.cost(kind) if p.chosen is None
                                                    else p.chosen.cost(kind) for p in open_plans)
            target["predicted"] = int(round(predicted))
            target["predicted_fraction"] = _round(predicted / target["original"])
    except Exception as exc:  # noqa: BLE001 - timing is advice here, never a reason to fail
        account.notes.append(f"speed check of the chosen forms skipped: {type(exc).__name__}: {exc}")
    return model


def build_modules(run: Run, plans: list[LayerPlan], data: Data, checks: dict[str, OutputChecker | None],
           replacements: Replacements, account: ResolutionAccount,
           speed_model: LatencyModel | None, goal: Goal) -> dict[str, nn.Module]:
    """The modules the result gets: built (or refit sequentially), regularized when a fit overfits (never
    into a build that fails the goal's bound in place of one that holds it), denormals flushed; then the
    whole network with these weights is timed when the speed check ran."""
    notes = account.notes
    prebuilt = replacements.build(run.progress)  # a probe's modules when the search measured this allocation
    if replacements.sequential or replacements.stats is not None:
        prebuilt, account.regularization = regularize(run.root, plans, run.opts, replacements, prebuilt, checks,
                                                      notes, run.deadline, run.progress, bound=goal.bound)
    flushed = sum(flush_denormals(module) for module in (prebuilt or {}).values())
    if flushed:
        notes.append(f"{flushed} denormal weights of the data-aware factors set to 0 (they run many times slower)")
    if account.speed_check is not None:  # the network as the caller gets it: these weights, denormals flushed
        try:
            account.speed_check["whole_model"] = check_whole_model(
                run.root, [p for p in plans if p.open], speed_model, data.inputs, account.speed_warnings,
                modules=prebuilt)
        except Exception as exc:  # noqa: BLE001 - timing is advice here, never a reason to fail
            notes.append(f"whole-network speed check skipped: {type(exc).__name__}: {exc}")
    if replacements.sequential and prebuilt:
        account.selection += "; factors refit sequentially on the partially factorized network's activations"
        if replacements.used < sum(len(b[0]) for b in data.batches):
            notes.append(f"sequential refit on the first {replacements.used} calibration samples (a large network)")
    if replacements.weight_only:
        notes.append(f"{len(replacements.weight_only)} layer(s) decomposed from their weights after the time "
                     f"budget ran out: {', '.join(sorted(replacements.weight_only))}")
    return prebuilt


def drop_until_faster(run: Run, plans: list[LayerPlan], goal: Goal, data: Data, model: LatencyModel | None,
                    prebuilt: dict[str, nn.Module], account: ResolutionAccount) -> tuple[Policy, dict[str, nn.Module]]:
    """The plain rules; when layers were timed, layers dropped until the whole model measures faster.

    A latency target was corrected by measurement already; dropping layers remains the last resort for
    ``auto`` rules and for a result still measured slower than the original.
    """
    resolved = resolved_policy(plans, keep_only_if_cheaper=goal.target is None)
    if model is None or not model.options.verify or data.inputs is None:
        return resolved, prebuilt
    if goal.target is not None and _search_measured_faster(account.search):
        return resolved, prebuilt
    droppable = [p for p in plans if p.chosen is not None and (goal.target is not None or p.rule.method == AUTO)]
    resolved, prebuilt, account.verification = verify_faster(run.root, plans, droppable, resolved, prebuilt,
                                                             data.shapes, data.inputs, model)
    return resolved, prebuilt


def _search_measured_faster(search: dict[str, Any] | None) -> bool:
    """Whether the search's last probe was measured below the original's time."""
    last = (search or {}).get("probes", [{}])[-1]
    return bool(last.get("measured")) and last.get("fraction", 2.0) < 1.0


def finish_account(run: Run, plans: list[LayerPlan], goal: Goal, model: LatencyModel | None,
                    account: ResolutionAccount) -> None:
    """The per-layer account, the predicted loss, the search's summary line and what the time budget cut."""
    if model is not None:
        account.latency = {"runtime": model.options.runtime, "device": model.options.device,
                           "threads": model.options.threads, "cache": str(model.cache.path),
                           "measured_variants": model.measured}
    kind = goal.target[0] if goal.target else "latency"
    account.layers = {p.name: layer_info(p, kind) for p in plans if p.rule is not None}
    account.predicted_loss = _round(sum(p.chosen.loss for p in plans if p.chosen is not None))
    if goal.bound is not None:
        account.fidelity_bound = goal.bound.to_dict()
    search = account.search
    if search is not None:
        if search.get("missed"):
            account.speed_warnings.append(search["missed"]["message"])
        search["share"] = progress_line(search["checks"], time.perf_counter() - run.started)
        if run.progress:
            say(search["share"])
    for warning in run.deadline.warnings:  # a cut latency correction costs speed; any other cut, accuracy
        (account.speed_warnings if "latency correction" in warning else account.warnings).append(warning)
    if run.opts.time_budget is not None:
        account.time_budget = {"seconds": run.opts.time_budget, "used": round(run.deadline.elapsed(), 2),
                               "cut": [w.split(": ", 1)[1] for w in run.deadline.warnings]}


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
