"""Automatic policy: budget-driven, data-aware and latency-aware choice of ranks and methods.

``resolve_policy`` turns a policy with a ``target`` (``{macs|params|latency: F}``), a ``fidelity`` bound or
``method: auto`` rules into plain per-layer rules, which ``convfactor.factorize`` then applies; with
calibration data it also builds the data-aware factorized modules. It runs the phases of ``phases``:

    statistics/    the held-out split, per-layer input statistics and sensitivities
    fits/          data-aware fits of each method (factors that minimize the layer's output error)
    selection/     layer plans, candidates, the allocation under a budget, fastest forms
    search/        allocations corrected by measuring whole candidate models; the final checks
    latency/       the latency model: candidate layers timed, cached on disk
    options, deadline, account, phases, resolve: the options, the time budget's clock, the report's
                   record, the phases, the entry point

Sub-packages import the core and each other downwards: statistics and latency import no other
sub-package, fits imports statistics, selection imports those three, search imports all four;
nothing here imports ``convfactor.api`` or ``convfactor.cli`` (tests/passes/test_dependency_direction.py).
``finetune`` and ``DistillOptions`` live in ``convfactor.distill`` and are re-exported here.
"""

from ..distill.finetune import finetune
from ..distill.training import DistillOptions
from .latency.model import LatencyCache, LatencyModel, LatencyOptions
from .options import AutoOptions
from .resolve import Resolution, resolve_policy
from .selection.allocate import Allocation, InfeasibleBudget, allocate
from .selection.vbmf import vbmf_layer_rank, vbmf_rank

__all__ = [
    "Resolution",
    "resolve_policy",
    "AutoOptions",
    "LatencyOptions",
    "LatencyModel",
    "LatencyCache",
    "Allocation",
    "InfeasibleBudget",
    "allocate",
    "finetune",
    "DistillOptions",
    "vbmf_rank",
    "vbmf_layer_rank",
]
