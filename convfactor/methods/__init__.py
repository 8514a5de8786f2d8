"""Factorization methods, registered by name. Importing this package registers the built-in ones."""

from .base import (
    FactorizationMethod,
    FactorizedLayer,
    Rank,
    available_methods,
    get_method,
    register,
)

__all__ = [
    "FactorizationMethod",
    "FactorizedLayer",
    "Rank",
    "available_methods",
    "get_method",
    "register",
]

# Built-in methods register themselves on import (one file per family).
import importlib as _importlib  # noqa: E402

BUILTIN_METHODS = ("spatial_svd", "tucker2", "cp", "depthwise", "grouped", "svd")
for _name in BUILTIN_METHODS:
    _importlib.import_module(f"{__name__}.{_name}")

# The course's other compressions (channel SVD, shift + pointwise, kernel dictionary).
# sal: the per-kernel form of the shift attention layer (an unstructured-pruning option).
for _name in ("channel_svd", "shift", "dictionary", "sal"):
    _importlib.import_module(f"{__name__}.{_name}")
