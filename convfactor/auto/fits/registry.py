"""Which data-aware fit each method has: the SVD family's (``data_aware``) and the fixed-basis ones (``taps``).

The registry sits above both fit modules, so neither imports the other's table: ``data_aware`` defines the
base class and the SVD-based fits, ``taps`` builds on the base class, and this module joins them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..statistics.covariance import Covariance
from .data_aware import DEFAULT_DAMPING, SVD_FACTORIZERS, LayerFactorizer
from .taps import TAP_FACTORIZERS

__all__ = ["DATA_AWARE_METHODS", "FACTORIZERS", "layer_factorizer"]

FACTORIZERS: dict[str, type[LayerFactorizer]] = {**SVD_FACTORIZERS, **TAP_FACTORIZERS}
# The order candidates are scored in (and reports list them).
DATA_AWARE_METHODS = ("svd", "spatial_svd", "tucker2", "channel_svd", "shift", "dictionary", "sal")
assert set(DATA_AWARE_METHODS) == set(FACTORIZERS)


def layer_factorizer(method_name: str, layer: nn.Module, sigma: torch.Tensor | Covariance,
                     damping: float = DEFAULT_DAMPING, weight: torch.Tensor | None = None,
                     progress: bool | str = False) -> LayerFactorizer | None:
    """The data-aware factorizer of ``method_name`` for ``layer``, or None if the method has none."""
    cls = FACTORIZERS.get(method_name)
    if cls is None:
        return None
    factorizer = cls(layer, sigma, damping, weight)
    factorizer.progress = progress
    return factorizer
