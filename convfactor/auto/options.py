"""Tuning knobs of the automatic policy, with the defaults ``factorize`` uses."""

from __future__ import annotations

from dataclasses import dataclass

from ..batches import DEFAULT_MAX_SAMPLES
from .fits.data_aware import DEFAULT_DAMPING
from .layout import LAYOUTS
from .selection.candidates import FRACTION_GRID
from .statistics.calibration import DEFAULT_MAX_ROWS, DEFAULT_MEMORY_BUDGET

__all__ = ["AutoOptions", "SLOW_METHODS", "OPT_IN_METHODS"]

# Excluded from ``method: auto`` unless listed in ``auto_methods``: CP's ALS takes seconds per rank on a
# 64-channel 3x3 layer (136 s for a 14-rank grid measured on 2 cores), too slow to evaluate a grid of
# candidates per layer. A rule naming ``method: cp`` still gets its ranks allocated.
SLOW_METHODS = ("cp",)
# Also left out of ``method: auto`` unless listed in ``auto_methods``, because on a typical k x k conv they
# lose to the default methods at equal cost: channel_svd costs more MACs per rank than spatial_svd
# (r*(C_in*k_h*k_w + C_out) against r*(C_in*k_h + C_out*k_w)), shift keeps whole taps (its error is coarse
# and its shift stage is memory traffic), and dictionary learning takes seconds per rank.
OPT_IN_METHODS = ("channel_svd", "shift", "dictionary", "sal")


@dataclass(frozen=True)
class AutoOptions:
    """How candidates are generated, scored and allocated.

    Attributes:
        fractions: fractions of each method's full rank tried per layer.
        auto_methods: methods ``method: auto`` may choose; None: every registered method but SLOW_METHODS
            and OPT_IN_METHODS.
        vbmf: add each layer's VBMF rank estimate to the grid (spatial_svd, svd, tucker2).
        max_samples: calibration samples used at most.
        max_rows: input patches per layer used for its covariance at most.
        damping: ridge of the data-aware whitening, relative to the mean input variance.
        sensitivity: measure each layer's sensitivity on the calibration data (else 1.0 for every layer).
        sensitivity_samples: calibration samples used for the sensitivity probes.
        sequential: with calibration data, refit the chosen layers in execution order on the inputs the
            partially factorized network gives them, so errors do not accumulate (two forward passes
            of the calibration data per replaced layer).
        bins: budget resolution of the allocator's dynamic program.
        seed: seed of the patch subsampling.
        fidelity_samples: calibration samples the whole-model fidelity checks run on at most.
        fidelity_rounds: bisection steps over the budget that hold a policy's fidelity bound.
        metric_evaluations: evaluations of the user's task metric the search may make (its probes); the
            original's and the result's are extra. Once spent, probes are judged by output error alone.
        speed_check: under a MACs/params target, time each chosen replacement against its layer and
            prefer a similar option that runs faster (``convfactor.auto.selection.slow_forms``).
        memory_budget: bytes the calibration statistics and one layer's fit may use (default 1 GiB): a
            layer whose full D x D patch covariance does not fit gets a Kronecker-factored or diagonal
            statistic instead (reported under ``statistics``); more budget keeps more layers full.
        workers: threads scoring layers' candidates at once (None: 1, the bounded-memory default; each
            worker holds one layer's fit, so peak memory grows with it).
        time_budget: seconds the resolution may take before its refinement phases stop early (None: no
            limit). Statistics, candidates, the allocation and one build of the result always run; the
            sensitivity probes, fidelity bisection rounds, latency corrections and the sequential refit
            stop once it is spent (the refit's remaining layers are decomposed from their weights), and
            ``report.warnings`` names each phase cut and when.
        layout: memory layout of the resolution's passes over the data: "auto" (channels-last where one
            sample runs at least 10% faster that way, timed on networks over 1 GMAC per sample), or
            "channels_last" / "contiguous" (``convfactor.auto.layout``); the result is the same to rounding.
    """

    fractions: tuple[float, ...] = FRACTION_GRID
    auto_methods: tuple[str, ...] | None = None
    vbmf: bool = True
    max_samples: int = DEFAULT_MAX_SAMPLES
    max_rows: int = DEFAULT_MAX_ROWS
    damping: float = DEFAULT_DAMPING
    sensitivity: bool = True
    sensitivity_samples: int = 128
    sequential: bool = True
    bins: int = 4000
    seed: int = 0
    fidelity_samples: int = 256
    fidelity_rounds: int = 7
    metric_evaluations: int = 12
    speed_check: bool = True
    memory_budget: float = DEFAULT_MEMORY_BUDGET
    workers: int | None = None
    time_budget: float | None = None
    layout: str = "auto"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {self.layout!r}")
        if self.time_budget is not None and (isinstance(self.time_budget, bool) or not self.time_budget > 0):
            raise ValueError(f"time_budget must be a positive number of seconds, got {self.time_budget!r}")
