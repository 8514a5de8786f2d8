"""The automatic-policy options ``convert`` and ``sweep`` share: fidelity bounds, data, metric and tuning.

``add_fidelity_arguments``: ``--max-rel-error``, ``--min-agreement``, ``--validation``, ``--metric``,
``--max-metric-drop``, ``--class-scores``, ``--class-probabilities``; ``add_tuning_arguments``:
``--memory-budget``, ``--no-refit``, ``--time-budget``. ``with_fidelity_options`` merges the bounds into the
policy (the command line wins), ``read_auto_options`` turns the tuning options into ``AutoOptions``.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..errors import PolicyError
from .options import memory_size, non_negative, seconds, unit_fraction

__all__ = ["add_fidelity_arguments", "add_tuning_arguments", "with_fidelity_options", "read_auto_options"]


def add_fidelity_arguments(group: Any) -> None:
    """The bounds, held-out data, task metric and class-score declarations."""
    group.add_argument("--max-rel-error", type=unit_fraction, metavar="X",
                       help="fidelity bound: the largest relative L2 error of the outputs against the original, "
                            "in (0, 1]; overrides the policy's fidelity: max_rel_error")
    group.add_argument("--min-agreement", type=unit_fraction, metavar="X",
                       help="fidelity bound: the smallest top-1 agreement with the original, in (0, 1]; "
                            "overrides the policy's fidelity: min_agreement")
    group.add_argument("--validation", metavar="INPUTS.pt",
                       help="real inputs no fit may see (torch.save tensor or .npy): the search selects on half, "
                            "the reported fidelity is measured on the other half; without it 1/4 of "
                            "--calibration is held out")
    group.add_argument("--metric", metavar="MODULE:FUNCTION",
                       help="your task metric, function(model) -> float on your own data (higher is better unless "
                            "the function has higher_is_better = False); imported because you name it here")
    group.add_argument("--max-metric-drop", type=non_negative, metavar="X",
                       help="fidelity bound: the task metric (--metric) at most X worse than the original's")
    group.add_argument("--class-scores", action="append", default=[], metavar="OUTPUT",
                       help="declare an output (index or name) as class scores: top-1 agreement is measured on it "
                            "(never on other outputs); repeatable")
    group.add_argument("--class-probabilities", action="append", default=[], metavar="OUTPUT",
                       help="declare an output (index or name) as class probabilities, already a distribution "
                            "along its class axis (e.g. after a final softmax): top-1 agreement as for "
                            "--class-scores, distilled with KL on its log instead of a second softmax; repeatable")


def add_tuning_arguments(group: Any) -> None:
    """Memory, refit and time of the automatic policy."""
    group.add_argument("--memory-budget", type=memory_size, metavar="SIZE",
                       help="memory the calibration statistics and one layer's fit may use: 2GB, 512MiB or "
                            "bytes (default 1GiB); a layer whose full statistics do not fit gets factored ones")
    group.add_argument("--no-refit", action="store_true",
                       help="do not refit the chosen layers in order on the partially factorized network's "
                            "activations (faster; errors may accumulate)")
    group.add_argument("--time-budget", type=seconds, metavar="SECONDS",
                       help="seconds the automatic policy's refinement may take (sensitivity probes, fidelity "
                            "search, sequential refit); phases cut short are named in the report's warnings")


def with_fidelity_options(policy: Any, args: argparse.Namespace) -> tuple[Any, dict[str, Any] | None]:
    """The policy with ``--max-rel-error``/``--min-agreement``/``--max-metric-drop`` merged into its fidelity
    section (they win) and ``--class-scores``/``--class-probabilities`` added to its output declarations (one
    output named by both is a ``PolicyError``), and what the summary shows
    of the bound: ``{"bound": {key: value}, "from": {key: option or "policy"}}``."""
    from ..fidelity_spec import parse_fidelity

    given = {key: value for key, value in (("max_rel_error", args.max_rel_error),
                                           ("min_agreement", args.min_agreement),
                                           ("max_metric_drop", args.max_metric_drop)) if value is not None}
    both = sorted(set(args.class_scores) & set(args.class_probabilities))
    if both:
        raise PolicyError(f"--class-scores and --class-probabilities both name output {both[0]!r}: it is logits "
                          "(--class-scores) or already a distribution (--class-probabilities), not both")
    kinds = [(output, "scores") for output in args.class_scores]
    kinds += [(output, "probabilities") for output in args.class_probabilities]
    if not given and not kinds:
        return policy, None
    merged = {**(policy.fidelity.to_dict() if policy.fidelity else {}), **given}
    if kinds:
        declared = dict(merged.get("outputs", {}))
        for output, kind in kinds:
            declared[output] = {**declared.get(output, {}), "kind": kind}
        merged["outputs"] = declared
    fidelity = parse_fidelity(merged)
    numbers = {key: value for key, value in merged.items() if isinstance(value, (int, float))}
    sources = {key: "--" + key.replace("_", "-") if key in given else "policy" for key in numbers}
    return dataclasses.replace(policy, fidelity=fidelity), ({"bound": numbers, "from": sources} if numbers else None)


def read_auto_options(args: argparse.Namespace) -> Any:
    """``AutoOptions`` changed as the automatic-policy options say, or None (factorize's defaults)."""
    changes: dict[str, Any] = {}  # one AutoOptions field per option of the group
    if args.no_refit:
        changes["sequential"] = False
    if args.time_budget is not None:
        changes["time_budget"] = args.time_budget
    if args.memory_budget is not None:
        changes["memory_budget"] = float(args.memory_budget)
    if not changes:
        return None
    from ..auto import AutoOptions

    return AutoOptions(**changes)
