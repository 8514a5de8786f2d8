"""The uniform baseline: one rank fraction for every eligible Conv layer, the largest that meets a
MACs target (found by bisection on the MACs of empty replacement modules; nothing is decomposed)."""
from __future__ import annotations

import torch
from torch import nn

from convfactor.costs import layer_macs, module_macs
from convfactor.methods import get_method


def _layer_inputs(model: nn.Module, example: tuple) -> dict[str, tuple]:
    """Input shape (batch 1) and MACs of every Conv2d in ``model`` on ``example``."""
    found: dict[str, tuple] = {}
    handles = []
    for name, sub in model.named_modules():
        if isinstance(sub, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            def hook(mod, args, out, name=name):
                found.setdefault(name, ((1, *args[0].shape[1:]), layer_macs(mod, out.shape)))
            handles.append(sub.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*[t[:1] for t in example])
    finally:
        for h in handles:
            h.remove()
    return found


def uniform_policy(method: str, fraction: float, types=("Conv2d",)) -> dict:
    return {"rules": [{"match": "*", "types": list(types), "method": method, "rank": float(fraction)}]}


def fraction_for_macs(model: nn.Module, example: tuple, method: str, target: float,
                      types=("Conv2d",), steps: int = 14) -> tuple[float, float]:
    """(largest fraction whose uniform ``method`` factorization has MACs <= target x original,
    the MAC ratio it gives). When no fraction reaches the target, the smallest tried and its ratio."""
    meth = get_method(method)
    layers = dict(model.named_modules())
    inputs = _layer_inputs(model, example)
    original = sum(macs for _, macs in inputs.values())
    cache: dict[tuple, int] = {}

    def ratio(fraction: float) -> float:
        total = 0
        for name, (shape, macs) in inputs.items():
            layer = layers[name]
            if type(layer).__name__ not in types or meth.unsupported_reason(layer) is not None:
                total += macs
                continue
            rank = meth.resolve_rank(layer, fraction)
            key = (name, rank)
            if key not in cache:
                cache[key] = module_macs(meth.build(layer, rank), shape)
            total += cache[key]
        return total / original

    lo, hi = 1e-3, 1.0
    if ratio(lo) > target:
        return lo, ratio(lo)
    for _ in range(steps):
        mid = (lo + hi) / 2
        if ratio(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo, ratio(lo)
