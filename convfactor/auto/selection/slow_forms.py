"""Under a MACs or params target, prefer replacements that run fast; say so for those that do not.

A MAC count does not say how fast a form runs: depthwise and grouped convolutions, or ranks off
onnxruntime's 16-channel blocks, can take longer than the dense layer they replace (depthwise on 64x1
convs measured 0.59x on a real network). After the allocation, each chosen replacement is timed alone
against its original layer in the latency model (one variant per layer, cached on disk). One measured
slower is swapped for an option of the same layer that costs no more, has a similar predicted loss
(at most ``SIMILAR_LOSS`` times) and is measured faster; when there is none it stays, with a warning. A
chosen rank off onnxruntime's channel blocks (not a multiple of ``BLOCK``) is also timed beside the
blocked options of similar cost and loss (the candidates hold x8/x16-aligned ranks), and the fastest of
those measured ``FASTER_BY`` faster takes its place.
The budget still holds: a swap never costs more.

Weights do change the time: a data-aware factor of PP-OCR's recognizer held 895 denormal weights (below
float32's smallest normal), its outputs 3% denormals, and the same network ran 2.07x faster with random
weights (x86 computes on denormals many times slower). ``flush_denormals`` sets them to zero: their
contribution is below float32's resolution of anything they are added to.

Layers can each be faster alone and the network still slower (layout reorders between forms onnxruntime
cannot block, overheads of many small convs): ``check_whole_model`` then times the whole network with the
chosen forms against the original once, when that is cheap, and warns when it is not faster.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from passes.modules import set_submodule

from ...methods import get_method
from ..latency.torch_timing import random_weights
from .plans import Choice

__all__ = ["SIMILAR_LOSS", "BLOCK", "FASTER_BY", "WHOLE_MODEL_MACS", "blocked", "prefer_fast_forms",
           "check_whole_model", "flush_denormals"]

SIMILAR_LOSS = 1.25
_ALTERNATIVES = 6  # options of a slow layer timed at most
BLOCK = 8  # channels: ranks that are multiples of it run in onnxruntime's blocked conv path unpadded or nearly
FASTER_BY = 0.05  # a blocked option replaces an unblocked choice when measured at least this much faster
# The whole network is timed against the original when it costs at most this many MACs per sample (two
# exports and a few seconds of pairs; ResNet-18 @224 has 1.8e9).
WHOLE_MODEL_MACS = 2e10


def blocked(rank: Any) -> bool:
    """Every channel count of ``rank`` is a multiple of ``BLOCK`` (what onnxruntime's blocked conv path runs
    without padding or layout reorders)."""
    parts = rank if isinstance(rank, tuple) else (rank,)
    return all(isinstance(p, int) and p % BLOCK == 0 for p in parts)


def prefer_fast_forms(plans: list[Any], kind: str, model: Any,
                      warnings: list[str]) -> tuple[dict[str, Any], dict[str, Choice]]:
    """Find a faster form of similar cost and loss for, or flag, each chosen replacement measured slower than its
    layer; returns the account and the swaps (choices, not applied).

    A chosen rank off onnxruntime's channel blocks is timed beside the blocked options of the same layer
    that cost no more and have a similar predicted loss; one measured at least ``FASTER_BY`` faster
    replaces it ("aligned": the MACs and error hardly change, the time does).

    Args:
        plans: the resolution's layer plans (``chosen``, ``options``, ``layer``, ``in_shape``, ``original``).
        kind: "macs" or "params": the cost a swap must not increase.
        model: a ``LatencyModel``.
        warnings: where a warning per replacement left slower goes.
    """
    started = time.perf_counter()
    swapped, slower, unresolved = [], [], []
    swaps: dict[str, Choice] = {}
    for plan in plans:
        option = plan.chosen
        if option is None or plan.in_shape is None:
            continue
        limit = max(option.loss * SIMILAR_LOSS, option.loss + 1e-12)
        similar = sorted((o for o in plan.options if o is not option and o.cost(kind) <= option.cost(kind)
                          and o.loss <= limit), key=lambda o: o.loss)
        aligned = [] if blocked(option.rank) else [o for o in similar if blocked(o.rank)][:_ALTERNATIVES]
        timed = [option, *aligned]
        original_ms, times = model.layer_times(plan.layer, plan.in_shape, [(o.method, o.rank) for o in timed])
        if model.unresolved(plan.layer, plan.in_shape):
            unresolved.append(plan.name)  # too fast to time alone: nothing to claim either way
            continue
        ms = times[(option.method, option.rank)]
        speed = original_ms / ms if ms > 0 else float("inf")
        quicker = [o for o in aligned if times[(o.method, o.rank)] <= (1 - FASTER_BY) * min(ms, original_ms)]
        if ms < original_ms and not quicker:
            continue
        faster = quicker
        if ms >= original_ms and not faster:
            alternatives = similar[:_ALTERNATIVES]
            if alternatives:
                _, alt_times = model.layer_times(plan.layer, plan.in_shape, [(o.method, o.rank) for o in alternatives])
                faster = [o for o in alternatives if alt_times[(o.method, o.rank)] < original_ms]
        if faster:
            best = min(faster, key=lambda o: (o.loss, o.cost(kind)))
            why = (f"which measured {speed:.2f}x the original layer's speed" if ms >= original_ms else
                   "whose rank is off onnxruntime's channel blocks")
            swaps[plan.name] = Choice(best, f"{best.label()} instead of {option.label()}, {why} (similar cost and "
                                            "predicted loss, runs faster)")
            swapped.append({"layer": plan.name, "from": option.label(), "to": best.label(), "speed": round(speed, 3)})
        else:
            slower.append({"layer": plan.name, "form": option.label(), "speed": round(speed, 3)})
            verdict = "slower" if speed < 0.995 else "not faster"  # 1.00x after rounding is not "slower"
            warnings.append(f"layer {plan.name}: {option.label()} measured {speed:.2f}x the original layer's speed "
                            f"({verdict}) in {model.options.runtime} at {model.options.threads} thread(s), and no "
                            f"option of similar cost and error runs faster (a latency target, or align: 16, avoids it)")
    return {"swapped": swapped, "slower": slower, "unresolved": unresolved,
            "seconds": round(time.perf_counter() - started, 3),
            "runtime": model.options.runtime, "threads": model.options.threads}, swaps


def check_whole_model(root: Any, plans: list[Any], model: Any, inputs: tuple, warnings: list[str],
                      max_macs: float = WHOLE_MODEL_MACS,
                      modules: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Time the network with every chosen form against the original; a warning when it is not faster.
    None when nothing was replaced; skipped above ``max_macs``.

    Args:
        root: the network the plans belong to (not modified).
        plans: the resolution's layer plans (``chosen``, ``layer``, ``original``).
        model: a ``LatencyModel`` (its runtime, threads and whole-model comparer).
        inputs: example inputs of ``root``.
        warnings: where the warning goes.
        modules: {layer: the replacement the result gets} (its real weights: weights change the time,
            see the module doc); a layer without one is timed with its form at random weights.
    """
    chosen = [p for p in plans if p.chosen is not None]
    if not chosen or inputs is None:
        return None
    macs = sum(p.original.macs or 0 for p in plans if p.original is not None)
    if macs > max_macs:
        return {"skipped": f"{macs:.3g} MACs per sample > {max_macs:.3g}: the whole network was not timed"}
    started = time.perf_counter()
    candidate = copy.deepcopy(root).eval()
    real = 0
    for plan in chosen:
        module = (modules or {}).get(plan.name)
        real += module is not None
        if module is None:
            module = random_weights(get_method(plan.chosen.method).build(plan.layer, plan.chosen.rank), seed=0)
        set_submodule(candidate, plan.name, module.eval())
    speed = float(model.speedup(root, candidate, inputs))
    if speed <= 1.0:
        verdict = "slower than" if speed < 0.995 else "not faster than"
        warnings.append(f"the factorized network as a whole measured {speed:.2f}x the original's speed ({verdict} "
                        f"the original) in {model.options.runtime} at {model.options.threads} thread(s), though "
                        f"its {len(chosen)} replacements save MACs; a latency target, or align: 16, makes it faster")
    return {"speedup": round(speed, 3), "seconds": round(time.perf_counter() - started, 3),
            "weights": "the result's" if real == len(chosen) else f"the result's for {real} of {len(chosen)} layers"}


def flush_denormals(module: Any) -> int:
    """Set the module's non-zero float32 parameters below float32's smallest normal to 0; returns how many."""
    import torch

    count = 0
    tiny = torch.finfo(torch.float32).tiny
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.dtype == torch.float32:
                denormal = (parameter != 0) & (parameter.abs() < tiny)
                count += int(denormal.sum())
                parameter[denormal] = 0.0
    return count
