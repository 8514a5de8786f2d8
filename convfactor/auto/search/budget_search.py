"""The budget an allocation is given, corrected by measuring the whole candidate model.

For a latency target, regula falsi on the measured time until it lands at most ``SPEED_TOLERANCE``
faster than the request and never slower (``_fit_speed``); then, with a fidelity bound, bisection
towards a larger budget until the measured error holds (the cheapest budget that does). A target the
bound does not allow is reported missed, with the measured shortfall; the model returned always holds
the bound. The measurements themselves are ``convfactor.auto.search.verify``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...output_checker import failures, rounded
from ...policy import Fidelity
from ..deadline import Deadline

__all__ = ["SPEED_TOLERANCE", "Probe", "SearchResult", "search_budget", "missed_target", "progress_line"]

SPEED_TOLERANCE = 0.05  # a latency target is met when the measured speedup is >= (1 - this) x the request


@dataclass
class Probe:
    """One measured allocation: the budget it was allocated at, its cost and its measured fidelity."""

    budget: float  # fraction of the original the allocator was given
    fraction: float  # cost of the result as a fraction of the original (measured for latency)
    measured: bool  # fraction is a measurement (latency) rather than an exact count
    metrics: dict[str, Any] | None = None
    ok: bool = True  # holds the fidelity bound (True when there is none)

    def to_dict(self) -> dict[str, Any]:
        out = {"budget": round(self.budget, 5), "fraction": round(self.fraction, 5), "measured": self.measured,
               "fidelity_ok": self.ok}
        if self.metrics is not None:
            out["rel_error"] = rounded(self.metrics["rel_error"], 5)
            if self.metrics.get("worst"):
                out["worst"] = self.metrics["worst"]
            if self.metrics.get("agreement") is not None:
                out["agreement"] = round(self.metrics["agreement"], 4)
            if "metric" in self.metrics:
                out["metric"] = rounded(self.metrics["metric"], 5)
            if "distilled" in self.metrics:  # judged after a short distillation (convfactor.auto.search.distill_probes)
                out["distilled"] = self.metrics["distilled"]
        return out


@dataclass
class SearchResult:
    """The budget chosen, its probe, every probe made, and whether the target was missed (and by how much)."""

    budget: float
    probe: Probe
    probes: list[Probe] = field(default_factory=list)
    missed: dict[str, Any] | None = None


def search_budget(trial: Callable[[float, bool], Probe], *, kind: str, target: float | None, lowest: float,
                  bound: Fidelity | None, rounds: int = 7, speed_rounds: int = 8,
                  deadline: Deadline | None = None) -> SearchResult:
    """The budget whose allocation meets the target as measured and holds ``bound``; see the module doc.

    Args:
        trial: (budget fraction, measure speed) -> Probe of the allocation at that budget.
        kind: "macs", "params" (exact costs) or "latency" (measured).
        target: the requested fraction of the original cost; None: as cheap as ``bound`` allows.
        lowest: the smallest budget fraction the allocator can meet.
        bound: the fidelity bound; None: only the target is corrected.
        rounds: bisection steps for the fidelity bound.
        speed_rounds: whole-model timings to correct a latency target.
        deadline: the time budget: once spent, no further correction or bisection round starts (the
            best budget measured so far is kept; without one that holds the bound, the original side).
    """
    probes: list[Probe] = []

    def run(budget: float, speed: bool) -> Probe:
        probe = trial(min(max(budget, lowest), 1.0), speed)
        probes.append(probe)
        return probe

    start = lowest if target is None else max(target, lowest)
    if kind == "latency" and target is not None:
        best = _fit_speed(run, target, lowest, speed_rounds, deadline)
    else:
        best = run(start, False)
    result = SearchResult(best.budget, best, probes)
    if kind == "latency" and target is not None and best.fraction > target / (1 - SPEED_TOLERANCE):
        result.missed = missed_target(kind, target, best, "the latency model cannot reach it on this runtime")
    if bound is None or best.ok:
        return result
    # Fidelity: more budget, less error. Bisect between the failing budget and the original (error 0).
    failing, holding, kept = best.budget, 1.0, None
    for done in range(rounds):
        if holding - failing < 1e-3:
            break
        if deadline is not None and deadline.spent():
            deadline.cut("fidelity bisection", f"stopped after {done} of {rounds} rounds (the cheapest budget "
                         "measured within the bound so far is kept)")
            break
        middle = (failing + holding) / 2
        probe = run(middle, False)
        if probe.ok:
            holding, kept = middle, probe
        else:
            failing = middle
    if kept is None:
        kept = run(1.0, False)
    if kind == "latency":
        kept = trial(kept.budget, True)  # the time of the model actually returned, for the report
        probes.append(kept)
    result.budget, result.probe = kept.budget, kept
    if target is not None:
        why = "the fidelity bound " + bound.describe()
        result.missed = missed_target(kind, target, kept, f"{why} does not hold at the target "
                                f"({'; '.join(failures(best.metrics or {}, bound))})")
    return result


def _fit_speed(run: Callable[[float, bool], Probe], target: float, lowest: float, rounds: int,
               deadline: Deadline | None = None) -> Probe:
    """Regula falsi on the measured time fraction until it lands in ``[target (1 - tol), target]``.

    The window sits on the fast side of the request: a later, independent timing scatters by a few
    percent, and a result accepted at the slow edge of the tolerance (``target / (1 - tol)``) reads as
    a miss there. Steps aim at the middle of the window.

    The budget axis is the latency model's prediction, and the whole graph can run quite differently
    (fusion, overheads, a total measured under other load): the measured fraction is only monotone in
    the budget. Steps interpolate between the closest budgets measured to meet and to miss the
    target; the original (budget 1, fraction 1) is the upper anchor until a miss is measured, and a
    step with nothing measured to meet it yet follows the secant of the last two probes (the first
    assumes time moves one for one with the budget). Each step stays inside the bracket, at least 5% of
    its width from either end, and moves by at most a factor of 2.
    Returned: the largest budget measured to meet the target (least cut, least error); else the one
    within tolerance of it; else the fastest measured.
    """
    accept = target / (1 - SPEED_TOLERANCE)
    aim = target * (1 - SPEED_TOLERANCE / 2)
    budget = max(target, lowest)
    met: Probe | None = None  # the largest budget measured at or below the target
    missed: Probe | None = None  # the smallest budget measured above it
    history: list[Probe] = []
    for done in range(max(rounds, 1)):
        if done and deadline is not None and deadline.spent():
            deadline.cut("latency correction", f"stopped after {done} of {rounds} whole-model timings")
            break
        probe = run(budget, True)
        history.append(probe)
        if probe.fraction <= target:
            if met is None or probe.budget > met.budget:
                met = probe
            if probe.fraction >= target * (1 - SPEED_TOLERANCE):
                break  # landed: at most the target, at most the tolerance faster
        elif missed is None or probe.budget < missed.budget:
            missed = probe
        high_b, high_m = (missed.budget, missed.fraction) if missed is not None else (1.0, 1.0)
        if met is not None:
            low_b = met.budget
            span = high_m - met.fraction
            following = low_b + (aim - met.fraction) * (high_b - low_b) / span if span > 1e-9 else low_b
        else:
            low_b = lowest
            following = probe.budget + (aim - probe.fraction)
            if len(history) >= 2:
                a, b = history[-2], history[-1]
                slope = (b.fraction - a.fraction) / (b.budget - a.budget) if b.budget != a.budget else 0.0
                if slope > 1e-6:
                    following = b.budget + (aim - b.fraction) / slope
        # A noisy timing must not throw the budget to an extreme: at most a factor of 2 per step.
        following = min(max(following, probe.budget / 2), probe.budget * 2)
        # Inside the bracket by 5% of its width (so it shrinks every step): clamped, not bisected, since
        # the upper end is often the original itself (budget 1) and its middle is far from any answer.
        margin = 0.05 * (high_b - low_b)
        following = min(max(following, low_b + margin), high_b - margin)
        following = min(max(following, lowest), 1.0)
        if high_b - low_b < 2e-3 or abs(following - probe.budget) < 1e-3 \
                or (missed is not None and probe.budget <= lowest):
            break
        budget = following
    if met is not None:
        return met
    close = [p for p in history if p.fraction <= accept]
    if close:
        return max(close, key=lambda p: p.budget)
    return min(history, key=lambda p: p.fraction)


def missed_target(kind: str, target: float, probe: Probe, why: str) -> dict[str, Any]:
    what = {"macs": "MACs", "params": "parameters", "latency": "time"}[kind]
    text = f"target {kind} {target:g} missed: the result costs {probe.fraction:.3f} of the original {what}"
    if kind == "latency":
        requested, reached = 1 / target, 1 / probe.fraction
        short = 1 - reached / requested
        text = (f"target latency {target:g} ({requested:.2f}x) missed: measured {reached:.2f}x "
                f"({probe.fraction:.3f} of the original time), {100 * short:.1f}% short")
    else:
        short = probe.fraction - target
        text += f" ({short:+.3f})"
    return {"kind": kind, "target": target, "reached": round(probe.fraction, 4), "shortfall": round(short, 4),
            "message": f"{text}; {why}"}


def progress_line(checks: dict[str, list], total: float) -> str:
    """'verify: 6 fidelity checks 0.8 s, 3 whole-model timings 7.1 s (38% of 20.9 s)'."""
    (f_calls, f_seconds), (t_calls, t_seconds) = checks["fidelity"], checks["latency"]
    b_calls, b_seconds = checks.get("builds", (0, 0.0))
    parts = [f"{f_calls} fidelity checks {f_seconds:.1f} s"] if f_calls else []
    parts += [f"{t_calls} whole-model timings {t_seconds:.1f} s"] if t_calls else []
    parts += [f"{b_calls} candidate models built {b_seconds:.1f} s"] if b_calls and b_seconds >= 0.05 else []
    whole = checks.get("total_seconds", f_seconds + t_seconds)  # with allocations and candidate builds
    other = whole - f_seconds - t_seconds - b_seconds
    parts += [f"allocations {other:.1f} s"] if other >= 0.05 else []
    share = f" ({100 * whole / total:.0f}% of {total:.1f} s)" if total > 0 else ""
    return "verify: " + (", ".join(parts) or "nothing measured") + share
