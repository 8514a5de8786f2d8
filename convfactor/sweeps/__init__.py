"""Which budget? ``sweep`` factorizes one network at several targets and measures every point.

    result = convfactor.sweep(model, ["macs=0.7,0.5,0.35", "latency=0.8"], x[:1], calibration=x)
    print(result.table())                       # held-out error, metric, measured speedup per point
    plot_sweep(result, "sweep.png")             # speedup against fidelity, Pareto front, uniform baseline
    best = result.models[result.best().label]   # the fastest model within the bound

Statistics, candidates and sensitivities are computed once and shared by the points
(``convfactor.auto.shared``); each point is the model ``factorize`` returns for its target alone.
Layout: ``points`` (targets, the baseline's rank search), ``driver`` (the sweep), ``measure`` (held-out
fidelity and speedup of a point), ``quantized`` (int8 points: ``sweep(..., quantize="int8")``), ``result``
(records, Pareto front, table), ``plot`` (the PNG).
"""

from .driver import sweep
from .plot import plot_sweep
from .points import Target, parse_targets
from .result import SweepPoint, SweepResult, pareto_front

__all__ = ["sweep", "plot_sweep", "Target", "parse_targets", "SweepPoint", "SweepResult", "pareto_front"]
