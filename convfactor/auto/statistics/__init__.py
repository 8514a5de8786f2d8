"""What the automatic policy knows about the data: the held-out split, per-layer input statistics, sensitivities.

    split          which samples fit, which select, which check (deterministic)
    patches        a layer's input patches and running second moments of them
    covariance     bounded-size patch covariances: full, Kronecker-factored, diagonal
    calibration    per-layer statistics collected with forward hooks
    sensitivity    layer sensitivities: each probe's effect on the network output
    suffix         a traced graph run once, and re-run from any node with its value replaced

May import: the core (``convfactor.geometry``, ``errors``, ``progress``) and ``convfactor.batches``;
nothing else of ``convfactor.auto``.
"""

__all__: list[str] = []
