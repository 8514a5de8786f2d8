"""Which layers the automatic policy decides on, with which methods, at what original cost.

Each Conv/Linear layer gets a ``LayerPlan``: the policy rule that matches it, the methods that can
represent it (``method: auto`` expands to every method ``AutoOptions`` allows), or the reason it is not
open to a decision; then its input shape, how often it runs per sample and its original cost.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from passes.factorize_layers import blocked_layers

from ...costs import count_params, layer_macs, per_layer_macs
from ...decisions import candidate_layers
from ...geometry import layer_kind
from ...methods import available_methods, get_method
from ...methods.base import FactorizationMethod
from ...policy import AUTO, SKIP, Policy, Rule
from ..options import OPT_IN_METHODS, SLOW_METHODS, AutoOptions
from .candidates import Option

__all__ = ["LayerPlan", "Choice", "apply_choices", "auto_methods", "plan_layers", "set_shapes_and_calls",
           "pass_samples", "PASS_MACS"]

# Network MACs the sensitivity probes and the sequential refit may each spend (a few minutes on 2 cores;
# the shipped digits models stay far below it): each uses at most that many calibration samples (but at
# least _MIN_PASS_SAMPLES).
PASS_MACS = 5e11
_MIN_PASS_SAMPLES = 16


@dataclass
class LayerPlan:
    """One layer's decision in the making: its rule, methods, options, sensitivity and choice."""

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


@dataclass(frozen=True)
class Choice:
    """A verdict on one layer: the option it takes (None: left as is) and why."""

    option: Option | None
    decision: str | None


def apply_choices(plans: Iterable[LayerPlan], choices: Mapping[str, Choice]) -> None:
    """Write ``choices`` into the plans they name: the one place a plan's ``chosen`` and ``decision`` change.

    The phases that decide (fastest forms, the allocation, faster-form swaps, latency drops) return
    choices; the resolution applies them here, and a search applies each probe's choices here before
    measuring the model they make.
    """
    for plan in plans:
        if plan.name in choices:
            plan.chosen, plan.decision = choices[plan.name].option, choices[plan.name].decision


def auto_methods(opts: AutoOptions) -> list[str]:
    """The methods ``method: auto`` may choose."""
    if opts.auto_methods is not None:
        return list(opts.auto_methods)
    return [m for m in available_methods() if m not in SLOW_METHODS + OPT_IN_METHODS]


def plan_layers(root: nn.Module, policy: Policy, opts: AutoOptions) -> list[LayerPlan]:
    """A plan per Conv/Linear layer of ``root``: its rule and methods, or why it is not open."""
    blocked = blocked_layers(root)
    plans = []
    for name, layer in candidate_layers(root):
        found = policy.rule_for(name, layer_kind(layer))
        plan = LayerPlan(name, layer, None if found is None else found[0], None if found is None else found[1])
        plans.append(plan)
        if found is None:
            plan.reason = "no policy rule matches"
            continue
        rule = plan.rule
        if rule.method == SKIP:
            plan.reason = f"rule {plan.rule_index + 1}: skip"
            continue
        names = auto_methods(opts) if rule.method == AUTO else [rule.method]
        reasons = []
        for method_name in names:
            method = get_method(method_name)
            why = method.unsupported_reason(layer)
            if why is None:
                plan.methods.append(method)
            else:
                reasons.append(why if why.startswith(method_name) else f"{method_name}: {why}")
        if rule.method == AUTO:
            _leave_reduced(plan)
        if name in blocked:
            plan.reason = blocked[name]
        elif not plan.methods:
            joined = "; ".join(reasons)
            plan.reason = joined if rule.method != AUTO else f"no method can represent it: {joined}"
    return plans


def _leave_reduced(plan: LayerPlan) -> None:
    """Drop from an auto plan the methods that reduce to another open one on its layer (``reduces_to``)."""
    open_names = {m.name for m in plan.methods}
    reduced = {m.name: m.reduces_to(plan.layer) for m in plan.methods}
    left = [name for name, to in reduced.items() if to is not None and to in open_names]
    if left:
        plan.methods = [m for m in plan.methods if m.name not in left]
        plan.notes.append(", ".join(f"{name} left to {reduced[name]}" for name in left)
                          + ": on this layer the same approximation or a costlier one (not scored)")


def set_shapes_and_calls(root: nn.Module, plans: list[LayerPlan], shapes: Mapping, inputs: Any) -> None:
    """Each plan's input shape, calls per sample and original cost (MACs of all calls, parameters)."""
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


def pass_samples(plans: list[LayerPlan], passes: int, wanted: int) -> int:
    """Samples for ``passes`` forward passes of the network within PASS_MACS (at least _MIN_PASS_SAMPLES)."""
    per_sample = sum(p.original.macs or 0 for p in plans if p.original is not None)
    if per_sample <= 0 or passes <= 0:
        return wanted
    return int(min(wanted, max(_MIN_PASS_SAMPLES, PASS_MACS // (passes * per_sample))))
