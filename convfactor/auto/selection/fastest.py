"""``method: auto`` without a target: per layer, the fastest method at the rule's rank spec.

Each method resolves the rule's rank (or energy, or ``rank: vbmf``), also rounded up to x8 and x16
channels when the rule sets no alignment; every variant is timed against the original layer in the
latency runtime and the fastest one measured faster than the original is chosen.
"""

from __future__ import annotations

from typing import Any

from ...costs import replacement_costs
from ...errors import PolicyError, RankError
from ...methods import get_method
from ...methods.base import FactorizationMethod, Rank
from ...policy import AUTO
from ...progress import track
from ..latency.model import LatencyModel
from ..options import AutoOptions
from .candidates import Option, rank_to_json
from .plans import Choice, LayerPlan
from .scoring import ALIGN_CHOICES, error_function
from .vbmf import vbmf_layer_rank

__all__ = ["VBMF_RANK", "choose_fastest"]

# A rule's ``rank: vbmf`` asks for the VBMF estimate (needs the policy change described in the report).
VBMF_RANK = "vbmf"


def _rule_rank(plan: LayerPlan, method: FactorizationMethod) -> Rank:
    rule = plan.rule
    if rule.rank == VBMF_RANK:
        rank = vbmf_layer_rank(method.name, plan.layer)
        return method.resolve_rank(plan.layer, rank=rank_to_json(rank), align=rule.align)
    return method.resolve_rank(plan.layer, rank=rule.rank, energy=rule.energy, align=rule.align)


def choose_fastest(plans: list[LayerPlan], opts: AutoOptions, stats: Any, model: LatencyModel | None,
                   progress: bool) -> dict[str, Choice]:
    """Each open plan's choice: the rule's own method and rank, or for ``auto`` the fastest measured.

    Fills each ``auto`` plan's timed ``options`` and ``dropped`` notes; the choices are returned, not applied.
    """
    factorizers: dict = {}  # data-aware fits made for scoring (the result's are made by ``refit``)
    choices: dict[str, Choice] = {}
    for plan in track([p for p in plans if p.open], progress, "methods"):
        rule = plan.rule
        if rule.method != AUTO:
            try:
                rank = _rule_rank(plan, plan.methods[0])
            except RankError as exc:
                raise RankError(f"{rule.describe(plan.rule_index)}, layer {plan.name!r}: {exc}") from None
            macs, params = replacement_costs(plan.methods[0], plan.layer, rank, plan.in_shape)
            option = Option(rule.method, rank, None if macs is None else macs * plan.calls, params)
            choices[plan.name] = Choice(option, f"rule {plan.rule_index + 1}")
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
                for align in ALIGN_CHOICES:  # timed beside the exact rank
                    aligned = method.resolve_rank(plan.layer, rank=rank_to_json(rank), align=align)
                    if aligned not in ranks:
                        ranks.append(aligned)
            for each in ranks:
                macs, params = replacement_costs(method, plan.layer, each, plan.in_shape)
                candidates.append(Option(method.name, each, None if macs is None else macs * plan.calls, params))
        if not candidates:
            choices[plan.name] = Choice(None, "no method resolves the rule's rank spec for this layer")
            continue
        original_ms, times = model.layer_times(plan.layer, plan.in_shape, [(o.method, o.rank) for o in candidates])
        plan.original.latency_ms = original_ms * plan.calls
        signals: dict[str, float] = {}  # the layer's E||W p||^2, shared by its options
        errors: dict[str, Any] = {}  # one error function (one decomposition) per method, for its ranks
        for option in candidates:
            option.latency_ms = times[(option.method, option.rank)] * plan.calls
            if option.method not in errors:
                errors[option.method] = error_function(plan, get_method(option.method), stats, factorizers, opts,
                                                       signals)
            option.error2 = float(errors[option.method](option.rank))
            option.loss = option.error2
        plan.options = candidates
        faster = [o for o in candidates if o.latency_ms < plan.original.latency_ms]
        plan.dropped += [f"{o.label()}: measured {o.latency_ms:.4f} ms >= original {plan.original.latency_ms:.4f} ms"
                        for o in candidates if o not in faster]
        if faster:
            choices[plan.name] = Choice(min(faster, key=lambda o: (o.latency_ms, o.error2)), "the fastest measured "
                                        "method at the rule's rank spec (or its x8/x16 rounding up)")
        else:
            choices[plan.name] = Choice(None, "no method at the rule's rank spec measured faster than the original "
                                              "layer")
    return choices

