"""A package's public names, each imported from its module on first use, and the names that moved.

``import convfactor`` stays quick: onnx, onnxruntime and the automatic policy load only when a name
that needs them is used, and so do sub-packages (``convfactor.runtime.benchmark`` works after
``import convfactor``). A name that moved to another package raises an ``AttributeError`` that says
where it lives now, in one line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from importlib import import_module
from typing import Any

__all__ = ["lazy_getattr"]


def lazy_getattr(package: str, namespace: dict[str, Any], lazy: Mapping[str, str],
                 moved: Mapping[str, str] | None = None, modules: Iterable[str] = ()) -> Callable[[str], Any]:
    """The module ``__getattr__`` of ``package``.

    Args:
        package: the package's ``__name__``.
        namespace: its ``globals()``; a loaded name is stored there, so it is imported once.
        lazy: public name -> module relative to ``package`` that defines it (``"runtime.fidelity"``).
        moved: former name -> the module to import it from now (``"convfactor.runtime"``).
        modules: sub-modules imported when used as an attribute (``"runtime"``).
    """
    moved, modules = moved or {}, frozenset(modules)

    def __getattr__(name: str) -> Any:
        if name in lazy:
            value = getattr(import_module(f".{lazy[name]}", package), name)
            namespace[name] = value
            return value
        if name in modules:
            return import_module(f".{name}", package)  # the import binds it in namespace
        if name in moved:
            raise AttributeError(f"{package}.{name} moved: use {moved[name]}.{name} "
                                 f"(from {moved[name]} import {name})")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
