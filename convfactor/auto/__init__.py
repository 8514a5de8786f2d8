"""Automatic policy: budget-driven, data-aware and latency-aware choice of ranks and methods.

``resolve_policy`` turns a policy with a ``target`` (``{macs|params|latency: F}``) or ``method: auto``
rules into plain per-layer rules, which ``convfactor.factorize`` then applies; with calibration data it
also builds the data-aware factorized modules. ``finetune`` is an optional short distillation of the
result towards the original network's outputs; ``DistillOptions`` (``factorize(..., distill=...)``) runs one
inside ``factorize``, stopped and judged on held-out data.
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
