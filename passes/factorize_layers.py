"""Factorize: replace each layer the policy matches by its factorized module, and say why for the rest.

Works on any module tree: a traced GraphModule (the factorized module is installed at the same
qualified name the graph calls) or, without tracing, the model itself (module-level replacement).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from convfactor.costs import count_params, layer_macs, per_layer_macs
from convfactor.errors import RankError
from convfactor.geometry import LayerGeometry, layer_kind
from convfactor.methods import get_method
from convfactor.methods.base import FactorizedLayer
from convfactor.policy import SKIP, Policy
from convfactor.report import REPLACED, SKIPPED, UNMATCHED, LayerDecision

from .manager import PassResult

__all__ = ["factorize_layers", "candidate_layers", "blocked_layers", "describe_shape", "weight_error"]

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
    from convfactor.auto.candidates import replacement_costs  # late: convfactor.auto imports this module

    if method.pruning:  # its saving is zeros in the weight (p_u), never MACs or parameters
        return None
    macs, params = replacement_costs(method, layer, rank, in_out[0] if in_out else None)
    before, after, what = ((decision.macs_before, macs, "MACs") if macs is not None and decision.macs_before
                           else (decision.params_before, params, "parameters"))
    if after < before:
        return None
    rank_text = "x".join(map(str, rank)) if isinstance(rank, tuple) else str(rank)
    return (f"{method.name} at rank {rank_text} would cost x{after / before:.2f} the {what} of the layer "
            f"(only_if_cheaper)")


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def blocked_layers(root: nn.Module) -> dict[str, str]:
    """Layers that must not be swapped: their parameters are shared or read directly by the graph."""
    owners: dict[int, list[str]] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(param), []).append(f"{name}.{pname}" if name else pname)
    blocked: dict[str, str] = {}
    for names in owners.values():
        modules_sharing = sorted({n.rpartition(".")[0] for n in names})
        if len(modules_sharing) > 1:
            for m in modules_sharing:
                others = ", ".join(o for o in modules_sharing if o != m)
                blocked[m] = f"its parameters are shared with {others} (tied weights)"
    graph = getattr(root, "graph", None)
    if graph is not None:
        for node in graph.nodes:
            if node.op == "get_attr":
                owner = str(node.target).rpartition(".")[0]
                blocked.setdefault(owner, f"the graph reads {node.target} directly (get_attr)")
    return blocked


def factorize_layers(
    root: nn.Module,
    policy: Policy,
    shapes: Shapes | None = None,
    *,
    progress: bool = False,
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
        PassResult whose ``changes`` is the list of LayerDecision, one per Conv/Linear layer.
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

    iterator = todo
    if progress and todo:
        from tqdm.auto import tqdm

        iterator = tqdm(todo, desc="factorizing", unit="layer", leave=False)
    prebuilt = prebuilt or {}
    for decision, layer, method, rank in iterator:
        new = prebuilt.get(decision.name)
        if new is None:
            new = method.decompose(layer, rank)
        elif new.method_name != method.name or new.rank != rank:
            raise ValueError(f"prebuilt module for {decision.name} is {new.method_name} at {new.rank}, "
                             f"the policy says {method.name} at {rank}")
        _set_submodule(root, decision.name, new)
        decision.status, decision.method = REPLACED, method.name
        decision.rank = list(rank) if isinstance(rank, tuple) else rank
        decision.params_after = count_params(new)
        decision.weight_error = weight_error(layer, new)
        in_out = shapes.get(decision.name)
        if in_out:
            x = torch.zeros((1, *in_out[0][1:]), dtype=layer.weight.dtype, device=layer.weight.device)
            decision.macs_after = sum(per_layer_macs(new, (x,)).values())
    modified = any(d.status == REPLACED for d in decisions)
    if modified and hasattr(root, "recompile"):
        root.recompile()
    return PassResult(root, modified, decisions, "factorize_layers")
