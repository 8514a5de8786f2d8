"""Deciding, layer by layer, what the policy replaces and why the rest stays: the report's rows.

``apply_policy`` is the library's side of the ``factorize_layers`` pass: it matches every Conv/Linear
layer against the policy (first matching rule wins), records a ``LayerDecision`` for each (replaced, or
skipped/unmatched with the reason), and hands the pass the replacements to build.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from passes import PassResult
from passes import factorize_layers as factorize_layers_pass
from passes.factorize_layers import Build, blocked_layers

from .costs import count_params, layer_macs, module_macs, replacement_costs
from .errors import RankError
from .geometry import LayerGeometry, layer_kind
from .methods import get_method
from .methods.base import FactorizedLayer
from .policy import SKIP, Policy
from .progress import track
from .ranks import rank_text, rank_to_json
from .report import REPLACED, SKIPPED, UNMATCHED, LayerDecision

__all__ = ["apply_policy", "decide_layers", "candidate_layers", "describe_shape", "weight_error"]

Shapes = Mapping[str, tuple[Sequence[int], Sequence[int]]]


def candidate_layers(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv1d/Conv2d/Linear layers of ``root`` by qualified name, excluding stages of factorized layers."""
    inside_factorized = set()
    out = []
    for name, module in root.named_modules():
        if isinstance(module, FactorizedLayer):
            inside_factorized.update(f"{name}.{child}" for child, _ in module.named_modules() if child)
        elif layer_kind(module) and name not in inside_factorized:
            out.append((name, module))
    return out


def describe_shape(layer: nn.Module) -> str:
    """'64->128 3x3 /2 d2 g2 same' style summary of a layer's geometry."""
    geo = LayerGeometry.of(layer)
    text = f"{geo.in_channels}->{geo.out_channels}"
    if geo.kind == "Linear":
        return text
    text += " " + "x".join(map(str, geo.kernel))
    if any(s != 1 for s in geo.stride):
        text += " /" + ",".join(map(str, geo.stride)) if len(set(geo.stride)) > 1 else f" /{geo.stride[0]}"
    if any(d != 1 for d in geo.dilation):
        text += " d" + ",".join(map(str, sorted(set(geo.dilation))))
    if geo.groups > 1:
        text += f" g{geo.groups}"
    if geo.padding == "same":
        text += " same"
    if geo.padding_mode != "zeros":
        text += f" {geo.padding_mode}"
    return text


@torch.no_grad()
def weight_error(original: nn.Module, factorized: FactorizedLayer) -> float:
    """||W - W_hat||_F / ||W||_F, computed in float64."""
    w = original.weight.detach().to(torch.float64)
    w_hat = factorized.dense_weight().to(torch.float64)
    norm = w.norm()
    return float((w - w_hat).norm() / norm) if norm > 0 else float((w - w_hat).norm())


def _costlier(method, layer: nn.Module, rank, in_out, decision: LayerDecision) -> str | None:
    """Why the replacement would not pay (it costs as many MACs or more; parameters without shapes), or None."""
    if method.pruning:  # a pruning form (sal) saves zeros, not MACs: it is never "not cheaper"
        return None
    macs, params = replacement_costs(method, layer, rank, in_out[0] if in_out else None)
    before, after, what = ((decision.macs_before, macs, "MACs") if macs is not None and decision.macs_before
                           else (decision.params_before, params, "parameters"))
    if after < before:
        return None
    return (f"{method.name} at rank {rank_text(rank)} would cost x{after / before:.2f} the {what} of the layer "
            f"(only_if_cheaper)")


def decide_layers(root: nn.Module, policy: Policy, shapes: Shapes | None = None) -> tuple[list[LayerDecision], list]:
    """One LayerDecision per Conv/Linear layer of ``root``, and the (decision, layer, method, rank) to replace.

    Raises:
        RankError: a rule's rank is out of range for a layer it matches (names rule and layer).
    """
    shapes = shapes or {}
    blocked = blocked_layers(root)
    decisions: list[LayerDecision] = []
    todo = []
    for name, layer in candidate_layers(root):
        kind = layer_kind(layer)
        in_out = shapes.get(name)
        macs = layer_macs(layer, in_out[1]) if in_out else None
        decision = LayerDecision(name=name, layer_type=kind, shape=describe_shape(layer), status=UNMATCHED,
                                 params_before=count_params(layer), params_after=count_params(layer),
                                 macs_before=macs, macs_after=macs)
        decisions.append(decision)
        found = policy.rule_for(name, kind)
        if found is None:
            decision.reason = "no policy rule matches"
            continue
        index, rule = found
        decision.rule = index + 1
        if rule.method == SKIP:
            decision.status, decision.reason = SKIPPED, f"rule {index + 1}: skip"
            continue
        method = get_method(rule.method)
        reason = method.unsupported_reason(layer) or blocked.get(name)
        if reason:
            prefix = "" if reason.startswith(rule.method) else f"{rule.method}: "
            decision.status, decision.reason = SKIPPED, prefix + reason
            continue
        try:
            rank = method.resolve_rank(layer, rank=rule.rank, energy=rule.energy, align=rule.align)
        except RankError as exc:
            raise RankError(f"{rule.describe(index)}, layer {name!r} ({decision.shape}): {exc}") from None
        if rule.only_if_cheaper:
            costlier = _costlier(method, layer, rank, in_out, decision)
            if costlier:
                decision.status, decision.reason = SKIPPED, costlier
                continue
        todo.append((decision, layer, method, rank))
    return decisions, todo


def _build(name: str, method, rank, prebuilt: FactorizedLayer | None) -> Build:
    def build(layer: nn.Module) -> nn.Module:
        if prebuilt is None:
            return method.decompose(layer, rank)
        if prebuilt.method_name != method.name or prebuilt.rank != rank:
            raise ValueError(f"prebuilt module for {name} is {prebuilt.method_name} at {prebuilt.rank}, "
                             f"the policy says {method.name} at {rank}")
        return prebuilt
    return build


def apply_policy(
    root: nn.Module,
    policy: Policy,
    shapes: Shapes | None = None,
    *,
    progress: bool | str = False,
    prebuilt: Mapping[str, FactorizedLayer] | None = None,
) -> PassResult:
    """Replace the layers of ``root`` (in place) that ``policy`` assigns a method to.

    Args:
        root: a GraphModule or plain module; modified in place (callers pass a copy).
        policy: the rules; first match wins.
        shapes: {layer name: (input shape, output shape)} from shape annotation; without it MACs are None.
        progress: show a progress bar over the layers being decomposed.
        prebuilt: {layer name: factorized module} computed elsewhere (e.g. data-aware factors from
            convfactor.auto) to install instead of decomposing the weights again; their method and
            rank must be what the policy resolves to for that layer.
    Returns:
        The ``factorize_layers`` PassResult with ``changes`` the list of LayerDecision, one per Conv/Linear layer.
    Raises:
        RankError: a rule's rank is out of range for a layer it matches (names rule and layer).
    """
    shapes = shapes or {}
    prebuilt = prebuilt or {}
    decisions, todo = decide_layers(root, policy, shapes)
    builds = {decision.name: _build(decision.name, method, rank, prebuilt.get(decision.name))
              for decision, _, method, rank in todo}
    result = factorize_layers_pass(root, builds, progress=(lambda items: track(items, progress, "factorizing"))
                                   if progress else None)
    by_name = {decision.name: (decision, method, rank) for decision, _, method, rank in todo}
    for name, layer, new in result.changes:
        decision, method, rank = by_name[name]
        decision.status, decision.method = REPLACED, method.name
        decision.rank = rank_to_json(rank)
        decision.params_after = count_params(new)
        decision.weight_error = weight_error(layer, new)
        in_out = shapes.get(name)
        if in_out:
            decision.macs_after = module_macs(new, in_out[0])
    result.changes = decisions
    return result
