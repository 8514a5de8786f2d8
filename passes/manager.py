"""PassResult and a tiny pass runner that says which pass failed and which ran before it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import PassInputError

__all__ = ["PassResult", "PassFailed", "run_passes"]


@dataclass
class PassResult:
    """The new GraphModule, whether the pass changed anything, and what it changed."""

    graph_module: nn.Module  # a torch.fx.GraphModule, or the module itself when it was not traced
    modified: bool
    changes: list[Any] = field(default_factory=list)
    name: str = ""


class PassFailed(RuntimeError):
    """A pass raised a non-user error: a bug in the pass, not a mistake in its input.

    The message names the pass and those that ran before it and says it is a bug, so that it is never
    mistaken for (or caught as) a user error: user mistakes derive from ``PassInputError`` instead.
    """


def run_passes(
    graph_module: nn.Module,
    passes: Sequence[Callable[[nn.Module], PassResult]],
) -> tuple[nn.Module, list[PassResult]]:
    """Run ``passes`` in order, each on the previous one's output.

    A ``PassInputError`` (a user mistake; library errors derive from it) passes through unchanged;
    anything else is re-raised as ``PassFailed`` naming the pass and its predecessors, so a bug report
    says where it broke.
    """
    results: list[PassResult] = []
    for pass_fn in passes:
        name = getattr(pass_fn, "__name__", repr(pass_fn))
        try:
            result = pass_fn(graph_module)
        except PassInputError:
            raise
        except Exception as exc:
            ran = ", ".join(r.name for r in results) or "none"
            raise PassFailed(f"pass {name!r} failed (passes run before it: {ran}): {exc} ({type(exc).__name__}: "
                             f"a bug in the pass, not in its input; please report it with this traceback)") from exc
        result.name = result.name or name
        results.append(result)
        graph_module = result.graph_module
    return graph_module, results
