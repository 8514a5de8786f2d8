"""Clean-up after rewriting: dead code elimination, unused submodules, graph lint, recompile."""

from __future__ import annotations

import torch.fx

from .manager import PassResult

__all__ = ["cleanup"]


def cleanup(graph_module: torch.fx.GraphModule) -> PassResult:
    """Remove dead nodes and the submodules nothing calls any more, lint and recompile."""
    before = {name for name, _ in graph_module.named_modules()}
    modified = graph_module.graph.eliminate_dead_code()
    graph_module.delete_all_unused_submodules()
    removed = sorted(before - {name for name, _ in graph_module.named_modules()})
    graph_module.graph.lint()
    graph_module.recompile()
    return PassResult(graph_module, modified or bool(removed), removed, "cleanup")
