"""What a resolution hands back: plain per-layer rules, data-aware modules, and its account per layer.

``resolved_policy`` writes each plan's choice as an exact-name rule; ``verify_faster`` is the last
resort of latency targets (layers dropped until the whole model measures faster than the original);
``layer_info`` is the JSON-able account of one layer for the report.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import nn

from ...decisions import apply_policy as factorize_layers  # the factorize_layers pass, driven by a policy
from ...decisions import describe_shape
from ...output_checker import rounded as _round
from ...policy import AUTO, SKIP, Policy, Rule
from ..latency.model import LatencyModel
from .candidates import Option, rank_to_json
from .plans import Choice, LayerPlan, apply_choices

__all__ = ["resolved_policy", "verify_faster", "layer_info"]


def resolved_policy(plans: list[LayerPlan], keep_only_if_cheaper: bool = False) -> Policy:
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


def verify_faster(root: nn.Module, plans: list[LayerPlan], chosen: list[LayerPlan], resolved: Policy,
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
    dropped: list[LayerPlan] = []
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
        apply_choices(plans, {p.name: Choice(None, "dropped after the whole factorized model was not faster than "
                                                   f"the original (measured {speedup:.3f}x)")
                              for p in dropped if p.chosen is not None})
        prebuilt = {k: v for k, v in prebuilt.items() if k not in {p.name for p in dropped}}
        resolved = resolved_policy(plans)
    apply_choices(plans, {p.name: Choice(None, "dropped: the factorized model was never measured faster than the "
                                               "original") for p in dropped if p.chosen is not None})
    prebuilt = {k: v for k, v in prebuilt.items() if k not in {p.name for p in dropped}}
    return resolved_policy(plans), prebuilt, {"rounds": rounds, "layers_dropped": [p.name for p in dropped]}


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


def layer_info(plan: LayerPlan, kind: str) -> dict[str, Any]:
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
