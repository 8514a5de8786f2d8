"""``factorize(model, policy)``: the pass pipeline (``convfactor.pipeline``) behind one call.

    copy -> capture (torch.fx) -> annotate shapes -> fold BatchNorm -> [resolve the policy] ->
    factorize layers -> clean-up

The caller's model is never modified. The result is a GraphModule (or, with ``trace=False``, a copy
of the model with layers swapped in place) carrying its report as ``result.convfactor_report``.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from passes.capture import CONCRETE_ARGS_META

from .api_checks import check_factorize_arguments, nothing_replaced_reason
from .costs import count_params, count_zeros, per_layer_macs
from .decisions import apply_policy
from .errors import ConvfactorError, PolicyError
from .inputs import Samples, as_input_tuple
from .metric import Metric
from .pipeline import run_pipeline
from .policy import Policy
from .report import SKIPPED, UNMATCHED, FactorizeReport
from .unsupported import is_supported_row, unsupported_layers

if TYPE_CHECKING:  # the automatic policy's option records, named in the signature only
    from concurrent.futures import Executor

    from .auto import AutoOptions, DistillOptions
    from .auto.shared import SharedWork

__all__ = ["factorize", "get_report"]

REPORT_ATTR = "convfactor_report"


def get_report(module: nn.Module) -> FactorizeReport:
    """The report ``factorize`` attached to its result."""
    report = getattr(module, REPORT_ATTR, None)
    if report is None:
        raise ConvfactorError("this module was not produced by convfactor.factorize (no report attached)")
    return report


def factorize(
    model: nn.Module,
    policy: Policy | Mapping | str,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    fold_batchnorm: bool = True,
    trace: bool = True,
    leaf_modules: Iterable[str | type] = (),
    concrete_args: Mapping[str, Any] | None = None,
    progress: bool = False,
    calibration: Samples | None = None,
    validation: Samples | None = None,
    metric: Callable[[nn.Module], float] | Metric | None = None,
    latency: Mapping[str, Any] | None = None,
    auto_options: AutoOptions | None = None,
    distill: int | DistillOptions | None = None,
    shared: SharedWork | None = None,
    executor: Executor | None = None,
) -> nn.Module:
    """Rewrite the Conv/Linear layers of a trained ``model`` as the policy says.

    Args:
        model: the trained network; it is deep-copied and never modified.
        policy: a ``Policy``, its dict form, a .yaml/.json path, or a method name
            (``"spatial_svd"``, ``"tucker2:0.5"``) meaning every eligible layer.
        example_inputs: a tensor or tuple of tensors; needed for MAC counts (and for folding
            BatchNorm after a Linear). Without it, MACs are reported as n/a.
        fold_batchnorm: fold eval-mode BatchNorm into the preceding conv first (needs tracing).
        trace: trace with torch.fx (default). ``False`` swaps modules in place on a copy without
            a graph: for models torch.fx cannot trace; BatchNorm is then not folded.
        leaf_modules: module names, class names or classes torch.fx should not trace into.
        concrete_args: values of ``forward`` arguments that are not tensors, fixed while tracing. Those
            not given that have a default of a plain type (bool, int, float, str, None) are traced with
            it. The result keeps them in its signature (``fast(x, embed=False)``) and refuses other values.
        progress: show a progress bar while decomposing.
        calibration: inputs from the real data distribution (a tensor, a list of batches or a
            DataLoader): layers are then factorized to minimize the error of their outputs on these
            inputs instead of the weight error, and budgets use measured sensitivities
            (see ``convfactor.auto``). Without ``validation``, every eighth sample (from the fourth) is held
            out to select on and every eighth (from the eighth) to check the result on; fits never see them.
        validation: inputs no fit sees (same forms as ``calibration``): the automatic search selects on
            half of them and the reported fidelity is measured on the other half.
        metric: the task metric, ``metric(model) -> float`` on the user's own data (higher is better unless
            ``metric.higher_is_better`` is False; ``convfactor.Metric``). Evaluated on the original and on
            the result (``report.extra['fidelity_check']``), and at the search's probes when the policy
            bounds it (``fidelity: {max_metric_drop: 0.01}``). ``Metric(fn, select=fn2)``: ``fn2`` is the
            metric on a second labelled set; with ``distill`` it decides the distilled state.
        latency: options of the latency model used by a ``latency`` target or ``method: auto``
            (e.g. ``{"threads": 1, "cache": path}``; see ``convfactor.auto``).
        auto_options: ``convfactor.auto.AutoOptions`` for a policy that is resolved (a target, ``auto``
            rules, calibration data): rank grid, methods ``auto`` may choose, sample counts, and the bytes
            the calibration statistics may use (``memory_budget``, default 1 GiB: layers whose full patch
            covariance does not fit get a Kronecker-factored or diagonal one, listed in the report's
            ``auto.statistics``).
        distill: a number of steps or ``convfactor.auto.DistillOptions``: then distil the result towards
            ``model`` on the calibration fit part (or ``DistillOptions.data``), stopped early on the select
            part's error and returned only if that error went down; when ``metric`` has a select set
            (``Metric(fn, select=fn2)``), that metric decides instead; needs ``calibration`` or ``validation``.
            Before/after on held-out data and the criterion in ``report.extra['distill']`` (docs/distill.md).
        shared: a ``convfactor.auto.shared.SharedWork`` passed to several calls on this model and data (what
            ``convfactor.sweep`` does): statistics, candidates and sensitivities are computed once and reused.
        executor: a ``concurrent.futures.Executor`` (a thread or process pool, ``dask_client.get_executor()``)
            the candidate scoring and sensitivity probes run on as tasks; the allocation is the serial one
            (``convfactor.executor``).
    Returns:
        The factorized module, in eval mode, with ``convfactor_report`` (see ``get_report``).
    Raises:
        ConvfactorError: every user mistake, with a one-line message, before any pass runs where it can be
            checked first (``convfactor.api_checks``): PolicyError, RankError, TraceError, InputSpecError
            (example inputs or calibration the model cannot take), CheckpointError (NaN/Inf weights).
        PassFailed: a bug inside a pass (not a ConvfactorError: it names the pass and asks for a report).

    Example:
        >>> fast = factorize(model, {"rules": [{"types": ["Conv2d"], "method": "spatial_svd",
        ...                                     "rank": 0.5}]}, torch.randn(1, 3, 32, 32))
        >>> print(get_report(fast))
    """
    if not isinstance(model, nn.Module):
        raise ConvfactorError(f"factorize needs an nn.Module, got {type(model).__name__}")
    policy = Policy.from_any(policy)
    inputs = as_input_tuple(example_inputs, allow_none=True)
    report = FactorizeReport(policy=policy.to_dict(), fold_batchnorm=fold_batchnorm and trace)
    if distill is not None:  # checked before any work; run after the factorization
        from .distill.result import check_distill_request, distill_result

        distill = check_distill_request(distill, calibration, validation)

    work = copy.deepcopy(model).eval()
    report.notes.extend(check_factorize_arguments(work, inputs, calibration=calibration, validation=validation,
                                                  leaf_modules=leaf_modules,
                                                  latency=latency, concrete_args=concrete_args,
                                                  auto_options=auto_options))
    unsupported = unsupported_layers(work)  # before tracing, which inlines a conv subclass into functional calls
    report.params_before = count_params(work)
    report.zeros_before = count_zeros(work)
    if inputs is not None:
        report.input_shapes = [list(t.shape) for t in inputs]
        report.macs_before = sum(per_layer_macs(work, inputs).values())

    resolution = None

    def rewrite(root: nn.Module, shapes, folded) -> Any:
        nonlocal policy, resolution
        prebuilt = None
        if policy.needs_resolution or calibration is not None or validation is not None or metric is not None:
            from .auto import resolve_policy  # budget / auto-method allocation

            resolution = resolve_policy(root, policy, shapes=shapes, example_inputs=inputs,
                                        calibration=calibration, validation=validation, metric=metric,
                                        latency=latency, progress=progress, options=auto_options, distill=distill,
                                        shared=shared, executor=executor)
            report.extra["auto"] = resolution.info
            report.policy = {"requested": policy.to_dict(), "resolved": resolution.policy.to_dict()}
            policy, prebuilt = resolution.policy, resolution.prebuilt
        result = apply_policy(root, policy, shapes, progress=progress, prebuilt=prebuilt)
        report.layers = result.changes + unsupported  # Conv3d, transposed convs, subclasses: with their reason
        _explain_auto_skips(report)
        _check_policy_matched(policy, report)
        return result

    bound = policy.bound
    done = run_pipeline(work, rewrite, example_inputs=inputs, trace=trace, fold_batchnorm=fold_batchnorm,
                        leaf_modules=leaf_modules, concrete_args=concrete_args)
    root = done.module
    if trace:
        report.notes[:0] = done.changes("capture")
        if root.meta.get(CONCRETE_ARGS_META):
            report.extra["concrete_args"] = dict(root.meta[CONCRETE_ARGS_META])
        report.folded = done.changes("fold_batchnorm")
    else:
        report.capture = "modules"
        report.notes.insert(0, "module-level replacement without a traced graph: BatchNorm was not folded")

    report.params_after = count_params(root)
    report.zeros_after = count_zeros(root)
    if inputs is not None:
        report.macs_after = sum(per_layer_macs(root, inputs).values())
    root.eval()
    if resolution is not None and distill is not None:  # in place, kept only if the held-out error went down
        distill_result(model, root, resolution, distill, report, progress)
    if resolution is not None:  # the fidelity floor: the result measured against the original
        from .auto.search.verify import check_result

        check_result(resolution.checks, root, report, resolution.info, bound, resolution.spec)
    if nothing_replaced_reason(report):
        report.warnings.append(nothing_replaced_reason(report))
    setattr(root, REPORT_ATTR, report)
    return root


def _explain_auto_skips(report: FactorizeReport) -> None:
    """A layer the allocator left as is says why (e.g. 'no replacement measured faster')."""
    auto_layers = report.extra.get("auto", {}).get("layers", {})
    for decision in report.layers:
        why = auto_layers.get(decision.name, {}).get("reason")
        if decision.status == SKIPPED and why and why != decision.reason:
            decision.reason = f"auto: {why}"


def _check_policy_matched(policy: Policy, report: FactorizeReport) -> None:
    layers = [d for d in report.layers if is_supported_row(d)]
    others = [d for d in report.layers if not is_supported_row(d)]
    if not layers and not others:
        raise PolicyError("the model has no Conv1d, Conv2d or Linear layer to factorize")
    if not layers:  # only layers convfactor cannot rewrite: listed with their reason, nothing replaced (a warning)
        return
    if all(d.status == UNMATCHED for d in layers):
        kinds = sorted({d.layer_type for d in layers})
        examples = ", ".join(repr(d.name) for d in layers[:3])
        named = [(rule, d) for rule in policy.rules for d in others if fnmatch.fnmatchcase(d.name, rule.match)]
        why = (f"; {named[0][0].describe(policy.rules.index(named[0][0]))} names {named[0][1].name!r}, a "
               f"{named[0][1].layer_type}: {named[0][1].reason}" if named else "")
        raise PolicyError(
            f"the policy matches no layer: its {len(policy.rules)} rule(s) match none of the "
            f"{len(layers)} {'/'.join(kinds)} layers it can rewrite (named like {examples}){why}"
        )
    used = {d.rule for d in report.layers if d.rule is not None}
    for index, rule in enumerate(policy.rules):
        if index + 1 not in used:
            report.notes.append(f"{rule.describe(index)} matched no layer")
