"""Measured search: allocations corrected by measuring the whole candidate model against the original.

    budget_search  the budget corrected by measurement (latency regula falsi, fidelity bisection)
    refit          the modules an allocation really gets (weight, data-aware or sequential fits)
    measured       the knapsack at any budget, and whole candidate models measured
    regularize     the data-aware fit's damping chosen by held-out error when a fit overfits
    distill_probes a failing probe judged again after a short distillation
    verify         whole-model speed checks, warnings, and the report's held-out check

May import: the core, ``convfactor.output_checker``, ``convfactor.distill``, ``convfactor.runtime`` and the
other ``auto`` sub-packages (statistics, fits, selection, latency); selection never imports it back.
"""

__all__: list[str] = []
