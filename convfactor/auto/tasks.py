"""The automatic policy's independent tasks, as functions an executor can run anywhere.

Each takes everything it needs as arguments and returns its result (no state shared with the caller),
so a ``concurrent.futures`` pool, a process pool or a Dask worker runs it the same way: pickled there,
its result pickled back. The caller applies the results in layer order (``convfactor.executor``).

- ``score_layer_task``: one layer's candidates scored (error2 of each option) and its sensitivity probe built;
- ``sensitivity_task``: the network run with one layer replaced by its probe (``layer_sensitivities``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn

from .calibration import layer_sensitivities

__all__ = ["score_layer_task", "sensitivity_task"]


def score_layer_task(score: Any, plan: Any, by_method: dict, kind: str, opts: Any, stats: Any,
                     probe: bool) -> tuple[list, list[str], str | None, nn.Module | None]:
    """``score(plan, ...)`` (``scoring._score_layer``) on ``plan``; returns what it set: options, notes,
    decision and probe module (a worker process scores its own copy of the plan)."""
    score(plan, by_method, kind, opts, stats, probe)
    return plan.options, plan.notes, plan.decision, plan.probe


def sensitivity_task(root: nn.Module, name: str, probe: nn.Module, batches: Sequence[tuple],
                     reference: Sequence[Sequence[Any]] | None, private: bool) -> dict[str, float] | None:
    """The sensitivity of layer ``name`` of ``root`` probed by ``probe`` on ``batches``.

    Args:
        private: ``root`` is this task's own (pickled to a worker); else it is copied first, since the probe
            hooks a layer and other tasks run the same network at the same time.
    """
    work = root if private else copy.deepcopy(root)
    layer = work.get_submodule(name)
    return layer_sensitivities(work, {name: layer}, {name: probe}, batches, reference=reference).get(name)
