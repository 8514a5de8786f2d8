"""The automatic policy's independent tasks, as functions an executor can run anywhere.

Each takes everything it needs as arguments and returns its result (no state shared with the caller),
so a ``concurrent.futures`` pool, a process pool or a Dask worker runs it the same way: pickled there,
its result pickled back. The caller applies the results in layer order (``convfactor.executor``).

- ``score_layer_task``: one layer's candidates scored (error2 of each option, kept errors read) and its
  sensitivity probe built;
- ``sensitivity_task``: a group of layers' sensitivities, each layer replaced by its probe (``layer_sensitivities``).
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..statistics.calibration import layer_sensitivities
from .plans import Choice

__all__ = ["score_layer_task", "sensitivity_task", "portable"]


def portable(module: nn.Module) -> bytes:
    """``module`` pickled for another process. A traced network (GraphModule) is rebuilt there from its code;
    torch.fx's plain tracer does it, not the capture tracer that made it (which expects the network it was
    tracing), and the bytes travel as they are (an engine's own serializer would pickle it its way)."""
    if getattr(module, "_tracer_cls", None) is not None:
        module = copy.copy(module)
        module.__dict__["_tracer_cls"] = None
    return pickle.dumps(module)


def score_layer_task(score: Any, plan: Any, by_method: dict, kind: str, opts: Any, stats: Any,
                     probe: bool, memo: dict | None = None) -> tuple[list, list[str], Choice | None, nn.Module | None,
                                                                 dict | None]:
    """``score(plan, ...)`` (``scoring._score_layer``) on ``plan``; returns what it set: options, notes,
    the choice it made (a layer left as is, with why), the probe module and the layer's kept errors
    (``error_memo``; a worker process scores its own copy of the plan and of the errors)."""
    memo = score(plan, by_method, kind, opts, stats, probe, memo)
    choice = None if plan.decision is None else Choice(plan.chosen, plan.decision)
    return plan.options, plan.notes, choice, plan.probe, memo


def sensitivity_task(root: nn.Module | bytes, probes: dict[str, nn.Module], batches: Sequence[tuple],
                     reference: Sequence[Sequence[Any]] | None) -> dict[str, dict[str, float]]:
    """The sensitivities of the layers ``probes`` names in ``root``, each probed by its module on ``batches``
    (``layer_sensitivities``: in a traced network the original runs once per batch for the whole group, each
    probe only the graph after its layer; each layer's sums are those of a run with every probe at once).

    Args:
        root: the network: ``portable`` bytes (this task's own copy, in a worker), or the module shared with
            other tasks of this process, then copied first (the probe hooks a layer while others run it).
    """
    work = pickle.loads(root) if isinstance(root, bytes) else copy.deepcopy(root)
    layers = {name: work.get_submodule(name) for name in probes}
    return layer_sensitivities(work, layers, probes, batches, reference=reference)
