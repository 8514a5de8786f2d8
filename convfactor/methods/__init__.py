"""Factorization methods, registered by name. Importing this package registers the built-in ones.

One module per method family, named as the method; ``BUILTIN_METHODS`` lists them all. A module that
fails to import fails ``import convfactor`` (a missing method is an error, not a silent gap).
"""

import importlib as _importlib

from .base import (
    FactorizationMethod,
    FactorizedLayer,
    Rank,
    available_methods,
    get_method,
    register,
)

__all__ = [
    "BUILTIN_METHODS",
    "FactorizationMethod",
    "FactorizedLayer",
    "Rank",
    "available_methods",
    "get_method",
    "register",
]

# The course's methods beside the classic ones: channel_svd (weight SVD), shift (shift + pointwise),
# dictionary (kernel dictionary), sal (the shift attention layer's per-kernel pruning form).
BUILTIN_METHODS = ("spatial_svd", "tucker2", "cp", "depthwise", "grouped", "svd",
                   "channel_svd", "shift", "dictionary", "sal")
for _name in BUILTIN_METHODS:
    _importlib.import_module(f"{__name__}.{_name}")
