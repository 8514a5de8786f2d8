"""A target's outcome: what was asked (a MACs, params or latency fraction) and what the result measured.

The summary and the JSON document of ``convert`` carry it, so a user never has to dig into the
automatic policy's account to learn whether the target was met: asked, measured (or predicted, for a
latency target without ``--bench``), met or missed by how much.
"""

from __future__ import annotations

from typing import Any

__all__ = ["target_outcome", "render_target"]


def target_outcome(target: tuple[str, float] | None, source: str, report: Any,
                   bench: Any = None) -> dict[str, Any] | None:
    """What was asked of a target and what the result measured: {kind, asked, from, measured, basis, met, by}.

    MACs and parameters are counted on the result; latency is the ``--bench`` median at its first thread
    setting when there is one, else the automatic policy's own figure (measured whole-model or predicted).
    """
    if target is None:
        return None
    kind, asked = target
    measured, basis = None, None
    if kind in ("macs", "params"):
        measured = report.macs_ratio if kind == "macs" else report.params_ratio
        basis = "counted on the result"
    elif bench is not None and bench.results:
        row = bench.to_dict()["results"][0]
        measured = row["factorized"]["median_ms"] / row["original"]["median_ms"]
        basis = f"--bench median at {row['threads']} thread(s)"
    else:
        account = (report.extra.get("auto") or {}).get("target") or {}
        for key, how in (("measured_fraction", "measured by the automatic policy"),
                         ("fraction_reached", "reached by the automatic policy"),
                         ("predicted_fraction", "predicted by the latency model; add --bench to measure")):
            if account.get(key) is not None:
                measured, basis = float(account[key]), how
                break
    out = {"kind": kind, "asked": asked, "from": source, "measured": measured, "basis": basis, "met": None,
           "by": None}
    if measured is not None:
        out["met"] = bool(measured <= asked + 1e-9)
        out["by"] = round(measured - asked, 6)
    return out


def render_target(outcome: dict[str, Any]) -> str:
    """One summary line: ``macs 0.5 (--target): 0.469 counted on the result, met`` or ``... MISSED by 0.03``."""
    head = f"{outcome['kind']} {outcome['asked']:g} ({outcome['from']})"
    if outcome["measured"] is None:
        return f"{head}: not measured (add --bench)"
    verdict = "met" if outcome["met"] else f"MISSED by {outcome['by']:.3g}"
    return f"{head}: {outcome['measured']:.3f} {outcome['basis']}, {verdict}"
