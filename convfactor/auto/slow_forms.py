"""Under a MACs or params target, prefer replacements that run fast; say so for those that do not.

A MAC count does not say how fast a form runs: depthwise and grouped convolutions, or ranks off
onnxruntime's 16-channel blocks, can take longer than the dense layer they replace (depthwise on 64x1
convs measured 0.59x on a real network). After the allocation, each chosen replacement is timed alone
against its original layer in the latency model (one variant per layer, cached on disk). One measured
slower is swapped for an option of the same layer that costs no more, has a similar predicted loss
(at most ``SIMILAR_LOSS`` times) and is measured faster; when there is none it stays, with a warning.
The budget still holds: a swap never costs more.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["SIMILAR_LOSS", "prefer_fast_forms", "undo_swaps"]

SIMILAR_LOSS = 1.25
_ALTERNATIVES = 6  # options of a slow layer timed at most


def prefer_fast_forms(plans: list[Any], kind: str, model: Any, warnings: list[str]) -> dict[str, Any]:
    """Swap or flag each chosen replacement measured slower than its layer; returns the account.

    Args:
        plans: the resolution's layer plans (``chosen``, ``options``, ``layer``, ``in_shape``, ``original``).
        kind: "macs" or "params": the cost a swap must not increase.
        model: a ``LatencyModel``.
        warnings: where a warning per replacement left slower goes.
    """
    started = time.perf_counter()
    swapped, slower, undo = [], [], []
    for plan in plans:
        option = plan.chosen
        if option is None or plan.in_shape is None:
            continue
        original_ms, times = model.layer_times(plan.layer, plan.in_shape, [(option.method, option.rank)])
        ms = times[(option.method, option.rank)]
        if ms < original_ms:
            continue
        limit = max(option.loss * SIMILAR_LOSS, option.loss + 1e-12)
        alternatives = sorted((o for o in plan.options if o is not option and o.cost(kind) <= option.cost(kind)
                               and o.loss <= limit), key=lambda o: o.loss)[:_ALTERNATIVES]
        faster = []
        if alternatives:
            _, alt_times = model.layer_times(plan.layer, plan.in_shape, [(o.method, o.rank) for o in alternatives])
            faster = [o for o in alternatives if alt_times[(o.method, o.rank)] < original_ms]
        speed = original_ms / ms if ms > 0 else float("inf")
        if faster:
            best = min(faster, key=lambda o: (o.loss, o.cost(kind)))
            undo.append((plan, option, plan.decision))
            plan.chosen = best
            plan.decision = (f"{best.label()} instead of {option.label()}, which measured {speed:.2f}x the original "
                             f"layer's speed (similar cost and predicted loss, runs faster)")
            swapped.append({"layer": plan.name, "from": option.label(), "to": best.label(), "speed": round(speed, 3)})
        else:
            slower.append({"layer": plan.name, "form": option.label(), "speed": round(speed, 3)})
            verdict = "slower" if speed < 0.995 else "not faster"  # 1.00x after rounding is not "slower"
            warnings.append(f"layer {plan.name}: {option.label()} measured {speed:.2f}x the original layer's speed "
                            f"({verdict}) in {model.options.runtime} at {model.options.threads} thread(s), and no "
                            f"option of similar cost and error runs faster (a latency target, or align: 16, avoids it)")
    return {"swapped": swapped, "slower": slower, "seconds": round(time.perf_counter() - started, 3),
            "runtime": model.options.runtime, "threads": model.options.threads, "undo": undo}


def undo_swaps(account: dict[str, Any]) -> None:
    """Put back the options ``prefer_fast_forms`` swapped out (e.g. when the result then fails a fidelity bound)."""
    for plan, option, decision in account.pop("undo", []):
        plan.chosen, plan.decision = option, decision
    account["swapped"] = []
