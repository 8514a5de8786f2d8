"""Allocations corrected by measurement: the knapsack at any budget, and whole candidate models measured.

``resolve_policy`` (``convfactor.auto.resolve``) builds the candidates; this module turns them into an
allocation that measures within the policy's target and fidelity bound (``convfactor.auto.search.verify``):

  * ``Allocator``: the knapsack of one resolution, its totals fixed once, solved at any budget fraction;
  * ``measured_allocation``: the search over the budget, each probe a whole candidate network: the
    modules the allocation would really return (``convfactor.auto.search.refit``: refit sequentially with
    calibration data) when a fidelity bound is checked, structure with random weights when only timed.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

from torch import nn

from passes.modules import set_submodule

from ...costs import count_params, per_layer_macs
from ...errors import PolicyError
from ...methods import get_method
from ...metric import Metric
from ...output_checker import OutputChecker, failures, rounded
from ...policy import Fidelity
from ..deadline import Deadline
from ..latency.model import LatencyModel
from ..latency.torch_timing import random_weights
from ..options import AutoOptions
from ..selection.allocate import InfeasibleBudget, allocate
from ..selection.plans import Choice, LayerPlan, apply_choices
from ..statistics.split import DataSplit, first_samples
from .budget_search import Probe, search_budget
from .refit import Replacements
from .verify import SpeedMeter

__all__ = ["Allocator", "model_total", "output_checkers", "install", "allocation_metrics",
           "measured_allocation"]


def model_total(root: nn.Module, kind: str, inputs: Any, plans: list[LayerPlan], model: LatencyModel | None) -> float:
    if kind == "macs":
        return float(sum(per_layer_macs(root, inputs).values()))
    if kind == "params":
        return float(count_params(root))
    return float(model.model_ms(root, inputs))


class Allocator:
    """The knapsack of one resolution: its totals fixed once, solved at any budget fraction."""

    def __init__(self, root: nn.Module, plans: list[LayerPlan], kind: str, inputs: Any, opts: AutoOptions,
                 model: LatencyModel | None):
        self.plans = [p for p in plans if p.open]
        self.kind, self.opts = kind, opts
        self.total = model_total(root, kind, inputs, plans, model)
        allocatable = math.fsum(p.original.cost(kind) for p in self.plans)
        self.scale = 1.0
        if kind == "latency" and allocatable > 0.95 * self.total:
            # Layers timed alone (at another time, under other load) add up to more than the whole model
            # measured now: scale them so the budget axis stays sane; the search measures the truth.
            self.scale = 0.95 * self.total / allocatable
        self.fixed = self.total - self.scale * allocatable
        self.groups = [[(self.scale * p.original.cost(kind), 0.0)]
                       + [(self.scale * o.cost(kind), o.loss) for o in p.options] for p in self.plans]
        cheapest = self.fixed + math.fsum(min(c for c, _ in g) for g in self.groups)
        self.lowest = cheapest / self.total if self.total else 1.0  # the smallest reachable fraction

    def budget_total(self, fraction: float) -> float:
        if self.kind == "latency":
            return fraction * self.total
        # The largest integer count whose ratio to the original does not exceed the fraction.
        budget_total = math.floor(fraction * self.total)
        while budget_total > 0 and budget_total / self.total > fraction:
            budget_total -= 1
        return budget_total

    def choose(self, fraction: float, notes: list[str] | None = None, *, strict: bool = True) -> dict[str, Any]:
        """Allocate at ``fraction`` of the original cost: sets every open plan's ``chosen``; returns the account."""
        kind, total, fixed = self.kind, self.total, self.fixed
        budget_total = self.budget_total(fraction)
        groups = self.groups
        try:
            allocation = allocate(groups, budget_total - fixed, self.opts.bins)
            solver, choice = allocation.solver, allocation.choice
        except InfeasibleBudget as infeasible:
            reachable = (infeasible.minimum + fixed) / total if total else 1.0
            if kind != "latency" and strict:
                raise PolicyError(
                    f"target {kind} {fraction} is not reachable: the cheapest candidates leave {reachable:.3f} of "
                    f"the original {kind} (layers the policy leaves alone: {max(fixed, 0) / total:.3f})") from None
            if notes is not None:
                source = "latency model" if kind == "latency" else "candidates"
                notes.append(f"{kind} target {fraction} not reachable by the {source}: every layer takes its "
                             f"cheapest candidate (predicted {reachable:.3f} of the original)")
            choice = tuple(min(range(len(g)), key=lambda i: (g[i][0], g[i][1])) for g in groups)
            solver = "cheapest per layer"
        choices = {plan.name: _allocated(plan, index) for plan, index in zip(self.plans, choice)}
        apply_choices(self.plans, choices)  # the probe measured next is the model these choices make
        predicted = fixed
        for plan in self.plans:
            predicted += self.scale * (plan.original.cost(kind) if plan.chosen is None else plan.chosen.cost(kind))
        exact = (lambda v: int(round(v))) if kind != "latency" else (lambda v: rounded(v, 4))  # counts stay exact
        return {"kind": kind, "fraction": fraction, "original": exact(total), "budget": exact(budget_total),
                "fixed": exact(fixed), "predicted": exact(predicted),
                "predicted_fraction": rounded(predicted / total) if total else None, "solver": solver,
                "choice": tuple(choice), **({"layer_time_scale": rounded(self.scale, 4)} if self.scale != 1 else {}),
                "basis": {"macs": "per sample, all Conv/Linear layers (convfactor.costs)",
                          "params": "parameters of the BatchNorm-folded model (<= the original's)",
                          "latency": "ms in the latency runtime (info['latency']): whole original model minus the "
                                     "per-layer savings measured"}[kind]}


def _allocated(plan: LayerPlan, index: int) -> Choice:
    """The allocation's choice for ``plan``: option ``index - 1``, or 0 for leaving the layer as is."""
    if index:
        return Choice(plan.options[index - 1], None)
    # A plan without options keeps the reason it has none.
    return Choice(None, "left as is by the allocation (its candidates cost more fidelity per unit saved)"
                  if plan.options else plan.decision)


def output_checkers(root: nn.Module, split: DataSplit, opts: AutoOptions, outputs: list | None = None,
                    spec: Fidelity | None = None, metric: Metric | None = None,
                    metric_original: float | None = None, shared: Any = None,
                    network: tuple | None = None) -> dict[str, OutputChecker | None]:
    """The checkers of a resolution, each on at most ``opts.fidelity_samples`` samples of its part:

    ``fit`` (in-sample: shown beside the held-out number; ``outputs`` are the original's outputs already
    computed on the first fit batches), ``select`` (every measurement the search decides by) and ``check``
    (the held-out number reported). Parts without data get None; ``check`` is ``select`` when the split
    could not separate them (``DataSplit.shared``). The task metric of the original (``metric_original``, or
    evaluated here) is evaluated once, while ``root`` is still the original (``factorize`` rewrites it in place
    afterwards). With ``shared`` (a ``SharedWork``), each part's reference outputs are those an earlier
    resolution of the same network computed on the same samples, where one did (``network``: ``root``'s key,
    ``SharedWork.network``, made here when not given).
    """
    original = None
    if metric is not None and split.select:
        original = metric_original if metric_original is not None else metric(root)
    if shared is not None and network is None:
        network = shared.network(root)

    def make(batches: list | None, label: str, known: list | None = None) -> OutputChecker | None:
        if not batches:
            return None
        batches = first_samples(batches, opts.fidelity_samples)
        kept = shared.outputs(network, batches) if shared is not None else None
        checker = OutputChecker(root, batches, label, kept or known, spec=spec, metric=metric,
                                metric_limit=opts.metric_evaluations, metric_original=original)
        if shared is not None and kept is None:
            shared.keep_outputs(network, batches, checker.reference)
        return checker

    label = split.check_label
    select = make(split.select, label if split.shared else f"{label} (selection part)",
                  outputs if not split.held_out else None)
    check = select if split.shared else make(split.check, label)
    fit = make(split.fit, "fit samples (in-sample)", outputs) if split.held_out and split.fit else None
    return {"fit": fit, "select": select, "check": check}


def install(work: nn.Module, plans: list[LayerPlan], modules: dict[str, nn.Module],
            originals: dict[str, nn.Module]) -> nn.Module:
    """``work`` with each plan's module from ``modules`` in place (its original where it has none)."""
    for plan in plans:
        set_submodule(work, plan.name, modules.get(plan.name, originals[plan.name]))
    return work


def allocation_metrics(root: nn.Module, plans: list[LayerPlan], replacements: Replacements,
                       checker: OutputChecker, bound: Fidelity | None) -> dict[str, Any]:
    """The checker's measurement of ``root`` with the plans' current choices as they would be returned."""
    work = copy.deepcopy(root).eval()
    open_plans = [p for p in plans if p.open]
    originals = {p.name: work.get_submodule(p.name) for p in open_plans}
    return checker.measure(install(work, open_plans, replacements.build(), originals), bound)


def measured_allocation(root: nn.Module, plans: list[LayerPlan], kind: str, fraction: float | None,
                        bound: Fidelity | None, inputs: Any, opts: AutoOptions, model: LatencyModel | None,
                        checker: OutputChecker | None, replacements: Replacements, notes: list[str],
                        deadline: Deadline | None = None, on_probe: Any = None, measure: Any = None
                        ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Allocate at the target, then correct the budget by measuring whole candidate models (``verify``).

    With a fidelity bound, each probe is the model the allocation would really return (``replacements``:
    the sequential refit with calibration data), so the bound is held at the lowest cost measured.
    ``on_probe(probe)`` sees each measured probe (the progress bar shows its error and metric). ``measure(module,
    bound)`` judges a probe instead of ``checker.measure`` (``distill_probes.ProbeDistiller``: distilled probes).
    Returns the allocation's account and the search's (None when nothing was measured).
    """
    allocator = Allocator(root, plans, kind, inputs, opts, model)
    speed = (kind == "latency" and fraction is not None and model is not None and model.options.verify
             and inputs is not None)
    enforce = bound is not None and checker is not None
    if bound is not None and checker is None:
        notes.append("fidelity bound not enforced: no example inputs or calibration data to measure it on")
    if not speed and not enforce:
        account = allocator.choose(fraction if fraction is not None else allocator.lowest, notes)
        account.pop("choice")
        return account, None
    meter = SpeedMeter(model, root, inputs) if speed else None
    work = copy.deepcopy(root).eval()
    originals = {p.name: work.get_submodule(p.name) for p in allocator.plans}
    timing_modules: dict[tuple, nn.Module] = {}
    seen: dict[tuple, Probe] = {}
    if fraction is not None and fraction < allocator.lowest and kind != "latency":
        allocator.choose(fraction, notes)  # raises the usual "not reachable" error

    spent = [0.0]  # seconds inside trials: allocation, candidate builds and the measurements

    def trial(budget: float, measure_speed: bool) -> Probe:
        started = time.perf_counter()
        try:
            return _trial(budget, measure_speed)
        finally:
            spent[0] += time.perf_counter() - started

    def _timing_modules() -> dict[str, nn.Module]:
        # Timing alone needs the structure, not the factors: skip the decomposition then.
        out = {}
        for plan in allocator.plans:
            if plan.chosen is not None:
                key = (plan.name, plan.chosen.method, plan.chosen.rank)
                if key not in timing_modules:
                    built = get_method(plan.chosen.method).build(plan.layer, plan.chosen.rank)
                    timing_modules[key] = random_weights(built, seed=0).eval()
                out[plan.name] = timing_modules[key]
        return out

    def _trial(budget: float, measure_speed: bool) -> Probe:
        account = allocator.choose(budget, strict=False)
        known = seen.get(account["choice"])
        if known is not None and (known.measured or not measure_speed):
            return Probe(budget, known.fraction, known.measured, known.metrics, known.ok)
        install(work, allocator.plans, replacements.build() if enforce else _timing_modules(), originals)
        judge = measure or checker.measure
        metrics = known.metrics if known is not None else (judge(work, bound) if enforce else None)
        ok = not failures(metrics, bound) if enforce else True
        if measure_speed:
            predicted = account["predicted_fraction"]
            speedup = meter.speedup(work, threshold=1.0 / fraction, expected=1.0 / predicted if predicted else None)
            probe = Probe(budget, 1.0 / speedup, True, metrics, ok)
        else:
            probe = Probe(budget, account["predicted_fraction"] or 0.0, False, metrics, ok)
        seen[account["choice"]] = probe
        if on_probe is not None:
            on_probe(probe)
        return probe

    calls_before, seconds_before = checker.calls if checker else 0, checker.seconds if checker else 0.0
    builds_before, build_seconds_before = replacements.builds, replacements.seconds
    try:
        result = search_budget(trial, kind=kind, target=fraction, lowest=allocator.lowest,
                               bound=bound if enforce else None, rounds=opts.fidelity_rounds, deadline=deadline)
    finally:
        if meter is not None:
            meter.close()
    account = allocator.choose(result.budget, notes, strict=False)
    account.pop("choice")
    account["fraction"], account["budget_fraction"] = fraction, rounded(result.budget, 4)  # requested, used
    reached = "measured_fraction" if result.probe.measured else "fraction_reached"
    account[reached] = rounded(result.probe.fraction, 4)
    search: dict[str, Any] = {"probes": [p.to_dict() for p in result.probes], "budget": rounded(result.budget, 4)}
    if result.probe.metrics is not None:
        search["fidelity"] = result.probe.to_dict()
        search["probe_models"] = "as returned (sequential refit)" if replacements.sequential else "as returned"
    if result.missed is not None:
        search["missed"] = result.missed
        notes.append(result.missed["message"])
    search["checks"] = {
        "fidelity": [(checker.calls - calls_before) if checker else 0,
                     round((checker.seconds - seconds_before) if checker else 0.0, 3)],
        "latency": [meter.calls if meter else 0, round(meter.seconds if meter else 0.0, 3)],
        "builds": [replacements.builds - builds_before, round(replacements.seconds - build_seconds_before, 3)],
        "total_seconds": round(spent[0], 3)}
    return account, search
