"""Distilled probes: with ``distill=``, the fidelity search judges a failing probe after a short distillation.

    probe (the allocation at a budget, as it would be returned) --measure SELECT--> holds the bound? done
    fails, and distilled probes left: copy --distill DistillOptions.probe_steps on FIT--> measure SELECT again

The short distillation's best state, and whether it replaces the undistilled probe, are decided as for the final
model (``convfactor.distill.criterion``: the task metric on its select set when given, else the select error).
So the cheapest allocation that keeps the bound *after* distillation is what the search returns; the final
model is then distilled with the full ``steps`` and measured on the check part as always. Bounded: at most
``DistillOptions.probes`` probes are distilled (each a copy, ``probe_steps`` steps); once spent, probes are
judged undistilled (a note says so), which can only make the search choose a larger budget.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...distill.training import DistillOptions, distill_model
from ...fidelity_spec import Fidelity
from ...output_checker import OutputChecker, failures, rounded
from ...progress import say

__all__ = ["ProbeDistiller"]


class ProbeDistiller:
    """``measure(module, bound)`` like ``OutputChecker.measure``, distilling a copy of a failing probe first.

    Args:
        teacher: the original (BatchNorm-folded) network; not changed.
        batches: the fit part (input tuples) the probes are distilled on.
        checker: the select part's checker (the search's).
        options: ``DistillOptions``; ``probes`` and ``probe_steps`` bound the work.
        progress: say each distilled probe on stderr.
    """

    def __init__(self, teacher: nn.Module, batches: Sequence[tuple[torch.Tensor, ...]], checker: OutputChecker,
                 options: DistillOptions, progress: bool | str = False):
        self.teacher, self.batches, self.checker, self.progress = teacher, list(batches), checker, progress
        self.options = dataclasses.replace(options, steps=min(options.probe_steps, options.steps), check_every=None,
                                           time_budget=None)
        self.limit = options.probes
        self.log: list[dict[str, Any]] = []
        self.skipped = 0

    def measure(self, module: nn.Module, bound: Fidelity | None = None) -> dict[str, Any]:
        metrics = self.checker.measure(module, bound)
        if bound is None or not failures(metrics, bound):
            return metrics
        if len(self.log) >= self.limit:
            self.skipped += 1
            return metrics
        started = time.perf_counter()
        if self.progress:
            say(f"fidelity search: probe fails undistilled ({'; '.join(failures(metrics, bound))}); distilled probe "
                f"{len(self.log) + 1}/{self.limit}: {self.options.steps} steps")
        student = copy.deepcopy(module)  # the probe's modules are the search's cache: never trained in place
        run = distill_model(student, self.teacher, self.batches, self.checker, self.options)
        distilled = self.checker.measure(student, bound) if run.improved else metrics
        self.log.append({"undistilled_rel_error": rounded(metrics["rel_error"], 5),
                         "distilled_rel_error": rounded(distilled["rel_error"], 5), "steps_run": run.steps_run,
                         "improved": run.improved, "decided_by": run.criterion["criterion"],
                         "holds": not failures(distilled, bound),
                         "seconds": round(time.perf_counter() - started, 2)})
        if not run.improved:
            return metrics
        return {**distilled, "distilled": self.log[-1]}

    def describe(self) -> dict[str, Any]:
        """For ``report.extra['auto']['search']['distilled_probes']``."""
        out: dict[str, Any] = {"limit": self.limit, "steps": self.options.steps, "probes": self.log}
        if self.skipped:
            out["note"] = (f"{self.skipped} failing probe(s) judged undistilled: the {self.limit} distilled probes "
                           "were spent (the search can only have chosen a larger budget)")
        return out
