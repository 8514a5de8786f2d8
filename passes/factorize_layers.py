"""Factorize: put a new module in place of each named layer, as the caller decides.

The pass knows nothing of policies or methods: it gets ``{layer name: build}``, where ``build(layer)``
returns the replacement (a factorized module, usually), and installs each at the same qualified name
the graph calls. Works on any module tree: a traced GraphModule (recompiled afterwards) or, without
tracing, the model itself (module-level replacement).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

from torch import nn

from .manager import PassResult
from .modules import set_submodule

__all__ = ["factorize_layers", "blocked_layers", "Replacement", "Build"]

Build = Callable[[nn.Module], nn.Module]  # the layer now -> the module to put in its place


class Replacement(NamedTuple):
    """One layer the pass replaced: its name, the module it was, the module it is now."""

    name: str
    old: nn.Module
    new: nn.Module


def blocked_layers(root: nn.Module) -> dict[str, str]:
    """Layers that must not be swapped, with why: their parameters are shared or read directly by the graph."""
    owners: dict[int, list[str]] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(param), []).append(f"{name}.{pname}" if name else pname)
    blocked: dict[str, str] = {}
    for names in owners.values():
        modules_sharing = sorted({n.rpartition(".")[0] for n in names})
        if len(modules_sharing) > 1:
            for m in modules_sharing:
                others = ", ".join(o for o in modules_sharing if o != m)
                blocked[m] = f"its parameters are shared with {others} (tied weights)"
    graph = getattr(root, "graph", None)
    if graph is not None:
        for node in graph.nodes:
            if node.op == "get_attr":
                owner = str(node.target).rpartition(".")[0]
                blocked.setdefault(owner, f"the graph reads {node.target} directly (get_attr)")
    return blocked


def factorize_layers(root: nn.Module, replacements: Mapping[str, Build], *,
                     progress: Callable[[list], Iterable] | None = None) -> PassResult:
    """Replace each layer named in ``replacements`` (in place) by what its build returns.

    Args:
        root: a GraphModule or plain module; modified in place (callers pass a copy).
        replacements: {qualified layer name: build}, in the order to build them.
        progress: wraps the list of (name, build) pairs in an iterator that reports progress (the
            caller's bar or log lines); None: silent.
    Returns:
        PassResult whose ``changes`` are ``Replacement(name, old, new)``, in the order given.
    """
    todo = list(replacements.items())
    iterator = progress(todo) if progress is not None and todo else todo
    changes = []
    for name, build in iterator:
        old = root.get_submodule(name)
        new = build(old)
        set_submodule(root, name, new)
        changes.append(Replacement(name, old, new))
    if changes and hasattr(root, "recompile"):
        root.recompile()
    return PassResult(root, bool(changes), changes, "factorize_layers")
