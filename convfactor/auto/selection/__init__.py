"""Choosing per layer: candidates, their predicted errors and costs, and the choice under a budget.

    plans          which layers are open, with which methods, at what original cost (``LayerPlan``)
    candidates     (method, rank) options over a rank grid with exact costs and weight errors
    vbmf           rank estimation by empirical variational Bayesian matrix factorization
    scoring        each open layer's options: costs, predicted errors, sensitivities
    depthwise_errors  depthwise's output error at every multiplier from one SVD per layer
    tasks          scoring and sensitivity probes as functions an executor runs anywhere
    allocate       one option per layer under a total budget (multiple-choice knapsack)
    fastest        ``method: auto`` without a target: the fastest method per layer
    slow_forms     under a MACs/params target, prefer forms that run fast
    outcome        the resolved rules and the per-layer account handed back

May import: the core, ``convfactor.methods``, ``auto.statistics``, ``auto.fits``, ``auto.latency``,
``auto.options`` and ``auto.deadline``; never ``auto.search`` (which builds on it).
"""

__all__: list[str] = []
