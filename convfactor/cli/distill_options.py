"""``convert --distill STEPS [--distill-data INPUTS.pt]``: the options and their reading, checked before any work.

They become ``factorize(..., distill=DistillOptions(...))`` (``convfactor.distill.training``): a short distillation
of the result towards the original, stopped on the select part's error, measured before and after on the
check part, and returned only if it helped (docs/distill.md). ``--select-metric MODULE:FUNCTION`` is the task
metric (``--metric``) on a second labelled set: with it, the metric decides instead of the output error
(``convfactor.distill.criterion``).
"""

from __future__ import annotations

import argparse
from typing import Any

from .options import positive_int

__all__ = ["add_distill_arguments", "read_distill_options", "steps"]


def steps(text: str) -> int:
    """A whole number of steps >= 1 (``--distill 200``).

    Raises:
        argparse.ArgumentTypeError: not a whole number, or below 1.
    """
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a whole number of steps >= 1, got {text!r}") from None


def add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    """The distillation group of ``convert``."""
    group = parser.add_argument_group("distillation (recover what factorization cost; needs --calibration or "
                                      "--validation)")
    group.add_argument("--distill", type=steps, metavar="STEPS",
                       help="then distil the result towards the original for at most STEPS steps on unlabelled "
                            "inputs (KL for --class-scores and --class-probabilities outputs, MSE per slice "
                            "otherwise), stopped early on the "
                            "held-out select part's error and within --time-budget; kept only if that error "
                            "went down")
    group.add_argument("--distill-data", metavar="INPUTS.pt",
                       help="unlabelled inputs to distil on (torch.save tensor or .npy); default: the "
                            "calibration fit part (never the select/check parts)")
    group.add_argument("--select-metric", metavar="MODULE:FUNCTION",
                       help="the --metric task metric on other labelled data than --metric's: then it decides "
                            "(early stop, and whether the distilled model is kept) instead of the output error, "
                            "and --metric's number stays held out; imported because you name it here")


def read_distill_options(args: argparse.Namespace, calibration: Any, validation: Any) -> Any:
    """``DistillOptions`` from ``--distill``/``--distill-data``, or None; one-line errors naming the flag (also for
    ``--select-metric`` given without ``--distill`` or ``--metric``; ``load_metric`` reads it)."""
    from ..errors import ConvfactorError
    from .checks import load_inputs_file

    if args.distill is None:
        if args.distill_data is not None:
            raise ConvfactorError("--distill-data is only used with --distill STEPS")
        if args.select_metric is not None:
            raise ConvfactorError("--select-metric is only used with --distill STEPS")
        return None
    if args.select_metric is not None and args.metric is None:
        raise ConvfactorError("--select-metric needs --metric MODULE:FUNCTION: it is that metric on other data")
    if calibration is None and validation is None:
        raise ConvfactorError("--distill needs --calibration INPUTS.pt (or --validation): its held-out parts stop "
                              "the distillation and measure it")
    data = load_inputs_file(args.distill_data, "--distill-data")
    if data is None and calibration is None:
        raise ConvfactorError("--distill needs inputs to distil on: --calibration (its fit part) or --distill-data")
    from ..distill.training import DistillOptions

    return DistillOptions(steps=args.distill, data=data)
