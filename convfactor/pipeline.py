"""The pass pipeline, defined once: ``factorize`` and ``load`` (rebuilding a saved model) both run it.

    capture (torch.fx) -> annotate_shapes -> fold_batchnorm -> factorize_layers -> cleanup

The passes are generic torch.fx passes (the top-level ``passes`` package, which never imports
convfactor); this module supplies what is convfactor's: factorized layers stay leaves when a model is
traced again, a tracing failure becomes ``TraceError``, and the caller says what to replace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from passes import PassResult, annotate_shapes, capture, cleanup, run_passes
from passes import fold_batchnorm as fold_batchnorm_pass  # the keyword argument shadows the name
from passes.errors import CaptureError

from .errors import TraceError
from .methods.base import FactorizedLayer

__all__ = ["run_pipeline", "PipelineResult", "Shapes", "Rewrite"]

Shapes = dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
# The layer-replacing step: (module, layer shapes, folded [layer, batchnorm] pairs) -> factorize_layers' result.
Rewrite = Callable[[nn.Module, Shapes, list], PassResult]


@dataclass
class PipelineResult:
    """The rewritten module and what each pass did, by pass name."""

    module: nn.Module
    shapes: Shapes
    results: dict[str, PassResult] = field(default_factory=dict)

    def changes(self, name: str) -> list:
        """The ``changes`` of pass ``name``, or [] when it did not run."""
        result = self.results.get(name)
        return result.changes if result is not None else []


def run_pipeline(
    model: nn.Module,
    rewrite: Rewrite,
    *,
    example_inputs: Sequence[torch.Tensor] | None = None,
    trace: bool = True,
    fold_batchnorm: bool = True,
    leaf_modules: Iterable[str | type] = (),
    concrete_args: Mapping[str, Any] | None = None,
) -> PipelineResult:
    """Run the passes on ``model`` (modified in place: pass a copy in eval mode).

    Args:
        model: the module to rewrite.
        rewrite: the step that replaces layers; it gets the traced module (or ``model`` itself with
            ``trace=False``), the layer shapes ({} without inputs) and the folded pairs.
        example_inputs: a tuple of tensors, or None; gives the shapes (and lets a BatchNorm after a
            Linear fold).
        trace: capture a torch.fx graph; ``False`` replaces modules in place, without folding.
        fold_batchnorm: fold eval-mode BatchNorm into the preceding layer (traced models only).
        leaf_modules, concrete_args: see ``passes.capture``.
    Raises:
        TraceError: torch.fx could not trace the model.
        PassFailed: a pass failed on something other than a user mistake (a bug).
    """
    state = PipelineResult(model, {})
    folded: list = []

    def capture_step(module: nn.Module) -> PassResult:
        try:
            return capture(module, leaf_modules=(*leaf_modules, FactorizedLayer), concrete_args=concrete_args,
                           n_inputs=None if example_inputs is None else len(example_inputs))
        except CaptureError as exc:
            raise TraceError(str(exc)) from exc

    def shapes_step(module: nn.Module) -> PassResult:
        result = annotate_shapes(module, example_inputs)
        state.shapes = result.changes[0]
        return result

    def fold_step(module: nn.Module) -> PassResult:
        result = fold_batchnorm_pass(module)
        folded.extend(result.changes)
        return result

    def rewrite_step(module: nn.Module) -> PassResult:
        return rewrite(module, state.shapes, folded)

    steps = [capture_step] if trace else []
    if example_inputs is not None:
        steps.append(shapes_step)
    if trace and fold_batchnorm:
        steps.append(fold_step)  # folding keeps each layer's name and output shape: the shapes stay valid
    steps.append(rewrite_step)
    if trace:
        steps.append(cleanup)
    for step, name in ((capture_step, "capture"), (shapes_step, "annotate_shapes"), (fold_step, "fold_batchnorm"),
                       (rewrite_step, "factorize_layers")):
        step.__name__ = name  # PassFailed names the pass
    state.module, results = run_passes(model, steps)
    state.results = {result.name: result for result in results}
    return state
