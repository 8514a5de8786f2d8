"""Capture: symbolic tracing of the user's model into a GraphModule.

torch.fx cannot trace Python control flow on tensor values, ``len()`` of a traced tensor, and the like.
When it fails we say in which module it failed and what to do: mark that module as a leaf (it is then
called as a black box; Conv/Linear layers inside it are still replaced, module by module), or skip
tracing entirely (``trace=False``: module-level replacement, no BatchNorm folding).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.fx
from torch import nn

from convfactor.errors import TraceError
from convfactor.methods.base import FactorizedLayer

from .manager import PassResult

__all__ = ["FactorizeTracer", "capture"]


class FactorizeTracer(torch.fx.Tracer):
    """A Tracer that keeps factorized layers and user-named modules as leaves and remembers where it was.

    Args:
        leaf_modules: qualified module names (``"backbone.attn"``), class names (``"MyBlock"``) or
            classes to call as black boxes instead of tracing through them.
    """

    def __init__(self, leaf_modules: Iterable[str | type] = ()):
        super().__init__()
        leaf_modules = list(leaf_modules)
        self.leaf_classes = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self._stack: list[tuple[str, str]] = []
        self.failed_in: list[tuple[str, str]] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, FactorizedLayer) or isinstance(m, self.leaf_classes):
            return True
        if module_qualified_name in self.leaf_names or type(m).__name__ in self.leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        self._stack.append((self.path_of_module(m), type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module is the one to report
                self.failed_in = list(self._stack)
            raise
        finally:
            self._stack.pop()


def capture(
    model: nn.Module,
    *,
    leaf_modules: Iterable[str | type] = (),
    concrete_args: Mapping[str, Any] | None = None,
) -> PassResult:
    """Trace ``model`` (not copied: pass a copy) into a GraphModule with the same submodule names.

    Raises:
        TraceError: naming the module where tracing stopped, the construct, and the two ways on.
    """
    tracer = FactorizeTracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=dict(concrete_args) if concrete_args else None)
    except Exception as exc:
        raise TraceError(_explain(model, tracer, exc)) from exc
    name = type(model).__name__
    graph_module = torch.fx.GraphModule(tracer.root, graph, name)
    return PassResult(graph_module, True, [], "capture")


def _explain(model: nn.Module, tracer: FactorizeTracer, exc: Exception) -> str:
    cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "control flow" in cause:
        construct = "Python control flow (if/while) on a tensor value"
    elif "iterate" in cause or "len(" in cause or "__len__" in cause:
        construct = "len() or iteration over a traced tensor"
    else:
        construct = f"{type(exc).__name__}: {cause}"
    where = f"the top-level forward of {type(model).__name__}"
    hint = "pass trace=False (CLI: --no-trace) for module-level replacement without a graph"
    if tracer.failed_in:
        path, cls = tracer.failed_in[-1]
        where = f"module {path!r} ({cls})"
        hint = (f"mark it as a leaf (leaf_modules=[{cls!r}], CLI: --leaf-module {cls}; its inner Conv/Linear "
                f"layers are still replaced) or {hint}")
    return f"torch.fx could not trace {type(model).__name__}: {construct} in {where}; {hint}"
