"""Saving a factorized model so it reloads without the architecture code knowing about factorization.

One file, ``torch.save`` of plain data, readable with ``torch.load(weights_only=True)``::

    {"format": "convfactor/1",
     "arch": {"factory": "pkg.models:build", "kwargs": {...}},   # or {"checkpoint": path, "kind": ...}
     "plan": report.plan(),            # capture mode, BatchNorm folding, method and rank per layer
     "state_dict": {...},              # the factorized model's tensors
     "input_shape": [1, 3, 32, 32] or None,
     "leaf_modules": [...], "folded": [[conv, bn], ...], "report": report.to_dict(),
     "concrete_args": {"embed": False, ...},   # non-tensor forward arguments as traced
     "convfactor_version": "0.1.0"}

``load`` rebuilds it: build the architecture, replay the structural part of ``factorize`` (trace, fold
BatchNorm, replace each planned layer by ``get_method(m).build(layer, rank)``), then
``load_state_dict(strict=True)``. The rebuilt model computes exactly what the saved one did (the same
graph with the same tensors), so its outputs are bit-identical.
"""

from __future__ import annotations

import copy
import io
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from passes import PassResult, factorize_layers
from passes.factorize_layers import Build

from .. import __version__
from ..api import get_report
from ..errors import CheckpointError, ConvfactorError, one_line
from ..geometry import layer_kind
from ..inputs import as_input_tuple
from ..methods import get_method
from ..pipeline import run_pipeline
from ..ranks import rank_from_json
from ..report import FactorizeReport, LayerDecision
from .architecture import Architecture, resolve_arch, stored_architecture
from .atomic import atomic_torch_save, atomic_write_bytes
from .checkpoint import FACTORIZED_FORMAT, check_finite, load_weights, read_checkpoint
from .exported_program import lift_exported_module

__all__ = [
    "FORMAT",
    "PLAN_FORMAT",
    "PLAN_ATTR",
    "factorized_payload",
    "save_factorized",
    "exported_program_bytes",
    "save_exported",
    "apply_plan",
    "rebuild",
    "load",
]

FORMAT = FACTORIZED_FORMAT
PLAN_FORMAT = "convfactor-plan/1"
PLAN_ATTR = "convfactor_plan"
_CAPTURE_MODES = ("fx", "modules")

ArchLike = str | Mapping | Architecture | Callable[..., nn.Module] | nn.Module | None


# -- saving -------------------------------------------------------------------------------------
def _arch_record(arch: str | Mapping | Architecture | None) -> dict[str, Any]:
    """The plain-data description of how to build the architecture again."""
    if arch is None:
        return {}
    if isinstance(arch, Architecture):
        return arch.to_dict()
    if isinstance(arch, str):
        return {"factory": arch, "kwargs": {}}
    if isinstance(arch, Mapping):
        return _plain(arch, "arch")
    raise ConvfactorError(f"arch must be a factory spec 'module:function', a dict or None, got {type(arch).__name__}")


def _plain(value: Any, what: str) -> Any:
    """A JSON round trip: only plain types survive, so ``weights_only=True`` can read them back."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as bad:
        raise ConvfactorError(f"{what} must be plain JSON data (str, number, list, dict): {bad}") from None


def factorized_payload(
    model: nn.Module,
    *,
    arch: str | Mapping | Architecture | None = None,
    input_shape: Sequence[int] | None = None,
    leaf_modules: Iterable[str] = (),
) -> dict[str, Any]:
    """The dict ``save_factorized`` writes: only tensors and plain types.

    Args:
        model: a result of ``convfactor.factorize`` (it carries the report and thus the plan).
        arch: how to build the unfactorized architecture: ``"pkg.module:factory"``, a dict
            ``{"factory": ..., "kwargs": {...}}``, or an ``Architecture``; None: ``load`` will need ``arch=``.
        input_shape: the example input shape; default: the one ``factorize`` was given.
        leaf_modules: the module names ``factorize`` kept as leaves (needed to trace the same graph again).
    Returns:
        The payload dict.
    Raises:
        ConvfactorError: ``model`` has no report, or a leaf module was given as a class.
    """
    report = get_report(model)
    leaf_modules = list(leaf_modules)
    if not all(isinstance(m, str) for m in leaf_modules):
        raise ConvfactorError("leaf_modules must be given by name to be saved (module or class names)")
    if input_shape is None and report.input_shapes and len(report.input_shapes) == 1:
        input_shape = report.input_shapes[0]
    state_dict = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    return {
        "format": FORMAT,
        "arch": _arch_record(arch),
        "plan": _plain(report.plan(), "plan"),
        "state_dict": state_dict,
        "input_shape": None if input_shape is None else [int(d) for d in input_shape],
        "leaf_modules": leaf_modules,
        "folded": _plain(report.folded, "folded"),
        "concrete_args": _plain(report.extra.get("concrete_args", {}), "concrete_args"),
        "report": _plain(report.to_dict(), "report"),
        "convfactor_version": __version__,
    }


def save_factorized(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    arch: str | Mapping | Architecture | None = None,
    input_shape: Sequence[int] | None = None,
    leaf_modules: Iterable[str] = (),
    force: bool = False,
) -> Path:
    """Write a factorized model to one reloadable file, atomically (see the module docstring).

    Args:
        model, arch, input_shape, leaf_modules: as for ``factorized_payload``.
        path: the destination (``.pt`` by convention).
        force: overwrite an existing file.
    Returns:
        The path written.

    Example:
        >>> fast = convfactor.factorize(build_model(), "spatial_svd:0.5", torch.randn(1, 3, 32, 32))
        >>> save_factorized(fast, "fast.pt", arch="models:build_model")
        >>> same = convfactor.load("fast.pt", arch="models:build_model")
    """
    payload = factorized_payload(model, arch=arch, input_shape=input_shape, leaf_modules=leaf_modules)
    return atomic_torch_save(payload, path, force=force)


def exported_program_bytes(model: nn.Module, example_inputs: Any) -> bytes:
    """``torch.export`` the model on its example inputs and return the ``.pt2`` archive as bytes.

    Raises:
        ConvfactorError: torch.export failed (the first line of its reason).
    """
    inputs = as_input_tuple(example_inputs)
    if inputs is None:
        raise ConvfactorError("a .pt2 output needs example inputs (--input-shape)")
    try:
        program = torch.export.export(model.eval(), inputs)
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
    except Exception as bad:
        raise ConvfactorError(f"torch.export of the factorized model failed: {one_line(bad, with_type=True)}") from None
    return buffer.getvalue()


def save_exported(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write ``torch.export.save`` of the (factorized) model to ``path`` (``.pt2``), atomically."""
    return atomic_write_bytes(path, exported_program_bytes(model, example_inputs), force=force)


# -- rebuilding ---------------------------------------------------------------------------------
def _check_plan(plan: Any) -> dict[str, Any]:
    if not isinstance(plan, Mapping) or plan.get("format") != PLAN_FORMAT:
        found = plan.get("format") if isinstance(plan, Mapping) else type(plan).__name__
        raise CheckpointError(f"not a convfactor plan of format {PLAN_FORMAT!r} (found {found!r})")
    if plan.get("capture") not in _CAPTURE_MODES:
        raise CheckpointError(f"plan: unknown capture mode {plan.get('capture')!r} (expected fx or modules)")
    layers = plan.get("layers")
    if not isinstance(layers, Mapping):
        raise CheckpointError("plan: 'layers' must map layer names to {method, rank}")
    for name, entry in layers.items():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("method"), str) or entry.get("rank") is None:
            raise CheckpointError(f"plan: layer {name!r} needs a method name and a rank, got {entry!r}")
    return dict(plan)


def apply_plan(
    model: nn.Module,
    plan: Mapping[str, Any],
    *,
    example_inputs: Any = None,
    leaf_modules: Iterable[str | type] = (),
    expected_folded: Sequence[Sequence[str]] | None = None,
    concrete_args: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Give a copy of ``model`` the factorized structure a plan describes (weights left to the caller).

    Replays the structural steps of ``factorize``: trace (``capture == "fx"``), fold BatchNorm when the
    plan did, and put ``get_method(method).build(layer, rank)`` in place of each planned layer.

    Args:
        model: the unfactorized architecture (its weights do not matter); not modified.
        plan: ``FactorizeReport.plan()``.
        example_inputs: the inputs ``factorize`` had, when it had some: folding a BatchNorm after a
            Linear depends on the traced shapes.
        leaf_modules: the leaf modules ``factorize`` was given.
        expected_folded: the ``[layer, batchnorm]`` pairs folded at factorization; a different result
            here means the architecture changed, and is an error.
        concrete_args: the non-tensor forward arguments ``factorize`` traced with.
    Returns:
        The module with the planned structure, in eval mode, ``convfactor_plan`` attached.
    Raises:
        CheckpointError: the plan names a layer the architecture lacks, or folding differs.
    """
    plan = _check_plan(plan)
    inputs = as_input_tuple(example_inputs, allow_none=True)

    def rewrite(root: nn.Module, shapes, folded) -> PassResult:
        if expected_folded is not None and sorted(map(list, folded)) != sorted(map(list, expected_folded)):
            raise CheckpointError(
                f"BatchNorm folding differs from the saved model ({len(folded)} pairs now, "
                f"{len(expected_folded)} saved): the architecture is not the one that was factorized"
            )
        builds = {name: _planned_build(root, name, entry) for name, entry in plan["layers"].items()}
        return factorize_layers(root, builds)

    root = run_pipeline(copy.deepcopy(model).eval(), rewrite, example_inputs=inputs, trace=plan["capture"] == "fx",
                        fold_batchnorm=plan.get("fold_batchnorm", False), leaf_modules=leaf_modules,
                        concrete_args=concrete_args).module
    root.eval()
    setattr(root, PLAN_ATTR, plan)
    return root


def _planned_build(root: nn.Module, name: str, entry: Mapping[str, Any]) -> Build:
    """How to build planned layer ``name`` of ``root`` from the architecture's layer (weights come later).

    Raises:
        CheckpointError: ``root`` has no layer ``name``, or not a Conv1d/Conv2d/Linear one.
    """
    try:
        layer = root.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"the plan replaces layer {name!r}, which the architecture does not have") from None
    if layer_kind(layer) is None:
        raise CheckpointError(f"the plan replaces layer {name!r}, but it is a {type(layer).__name__} in the "
                              f"architecture, not a Conv1d/Conv2d/Linear")
    method, rank = get_method(entry["method"]), rank_from_json(entry["rank"])
    return lambda layer: method.build(layer, rank)


def _floating_dtype(state_dict: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    dtypes = {t.dtype for t in state_dict.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _architecture(record: Mapping[str, Any], arch: ArchLike, arch_kwargs: Mapping | None,
                  trust_checkpoint: bool, trust_code: bool = False, where: str = "the checkpoint") -> nn.Module:
    """The unfactorized model: from ``arch`` when given, else from the stored record.

    The stored record is code the file chooses: a factory is imported only if it is convfactor's own or
    the caller trusts the file (``trust_code`` or ``trust_checkpoint``), a pickled model only with
    ``trust_checkpoint``.
    """
    if isinstance(arch, nn.Module):
        return copy.deepcopy(arch)
    if isinstance(arch, Architecture):
        return arch.build()
    stored_kwargs = dict(record.get("kwargs") or {})
    kwargs = dict(arch_kwargs) if arch_kwargs is not None else stored_kwargs
    if callable(arch):
        model = arch(**kwargs)
        if not isinstance(model, nn.Module):
            raise ConvfactorError(f"arch returned {type(model).__name__}, not a torch.nn.Module")
        return model
    if isinstance(arch, str):
        return resolve_arch(arch, kwargs).build()
    if arch is not None:
        raise ConvfactorError(f"arch must be a factory spec, a callable or a module, not {type(arch).__name__}")
    if record.get("factory"):
        trusted = trust_code or trust_checkpoint
        return stored_architecture(record, trusted=trusted, where=where, kwargs=arch_kwargs).build()
    source, kind = record.get("checkpoint"), record.get("kind")
    if source and kind in ("exported", "module"):
        if not Path(source).is_file():
            raise CheckpointError(f"the architecture was the {kind} checkpoint {source}, which no longer exists; "
                                  f"pass arch= (CLI: --arch)")
        if kind == "module" and not trust_checkpoint:
            raise CheckpointError(f"the architecture is the pickled model {source}; rebuilding it unpickles that "
                                  f"file: pass trust_checkpoint=True (CLI: --trust-checkpoint) if you trust it, "
                                  f"or arch=")
        original = read_checkpoint(source, trust=trust_checkpoint)
        if original.kind == "exported":
            return lift_exported_module(original.content)
        if original.kind == "module":
            return original.content
        raise CheckpointError(f"{source} no longer holds a {kind} checkpoint; pass arch= (CLI: --arch)")
    raise CheckpointError("the checkpoint does not say how to build its architecture; pass arch= (CLI: --arch)")


def rebuild(
    payload: Mapping[str, Any],
    arch: ArchLike = None,
    *,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_checkpoint: bool = False,
    trust_code: bool = False,
    where: str = "the checkpoint",
) -> nn.Module:
    """The factorized model from an already read payload (see ``load``; ``where`` names it in errors)."""
    if payload.get("format") != FORMAT:
        raise CheckpointError(f"not a factorized convfactor checkpoint (format {payload.get('format')!r})")
    state_dict = payload.get("state_dict")
    if not isinstance(state_dict, Mapping):
        raise CheckpointError("the factorized checkpoint has no state_dict")
    plan = _check_plan(payload.get("plan"))
    model = _architecture(payload.get("arch") or {}, arch, arch_kwargs, trust_checkpoint, trust_code, where)
    dtype = _floating_dtype(state_dict)
    if dtype is not None:
        model = model.to(dtype)  # the saved model may have been converted (float64, say) after building
    input_shape = payload.get("input_shape")
    example = None
    if input_shape and plan.get("capture") == "fx" and plan.get("fold_batchnorm"):
        example = torch.zeros(tuple(input_shape), dtype=dtype or torch.float32)
    root = apply_plan(model, plan, example_inputs=example, leaf_modules=payload.get("leaf_modules") or (),
                      expected_folded=payload.get("folded"), concrete_args=payload.get("concrete_args"))
    load_weights(root, state_dict, where="factorized checkpoint")
    check_finite(root, "factorized checkpoint")
    report = _report_from_dict(payload.get("report"))
    if report is not None:
        from ..api import REPORT_ATTR

        setattr(root, REPORT_ATTR, report)
    return root.eval()


def load(
    path: str | os.PathLike,
    arch: ArchLike = None,
    *,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_checkpoint: bool = False,
    trust_code: bool = False,
) -> nn.Module:
    """Reload a model written by ``save_factorized`` (or ``convfactor convert --out model.pt``).

    The file names the factory that built its architecture, but a file never chooses code to run: give
    the architecture (``arch=``), or pass ``trust_code=True`` to let the file's factory be imported and
    called. Only the factories of convfactor's own zoo are built without either.

    Args:
        path: the file.
        arch: the unfactorized architecture, overriding the stored one: a factory spec
            ``"pkg.module:fn"``/``"file.py:fn"``, a callable, or a module instance (its weights do not matter).
        arch_kwargs: keyword arguments for a factory (default: the stored ones).
        trust_checkpoint: trust the file: allow unpickling when the stored architecture is a pickled
            model file, and importing the factory it names.
        trust_code: allow importing and calling the factory the file names (a file you trust).
    Returns:
        The factorized model in eval mode; ``convfactor.get_report`` works on it.
    Raises:
        CheckpointError: the file is missing, corrupt, not a factorized checkpoint, or does not fit; it
            names a factory and neither ``arch`` nor ``trust_code`` was given (nothing is imported).

    Example:
        >>> model = convfactor.load("resnet20_svd.pt", arch="models:build_resnet")
        >>> model(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """
    checkpoint = read_checkpoint(path)
    if checkpoint.kind != "factorized":
        raise CheckpointError(f"{path} is not a factorized convfactor checkpoint (it holds a {checkpoint.kind}); "
                              f"load it with torch.load or the CLI's --arch")
    return rebuild(checkpoint.content, arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint,
                   trust_code=trust_code, where=str(path))


def _report_from_dict(data: Any) -> FactorizeReport | None:
    """The FactorizeReport back from its ``to_dict()`` form (None if absent or not readable)."""
    if not isinstance(data, Mapping):
        return None
    fields = {k: v for k, v in data.items() if k not in ("totals", "plan", "costlier")}  # derived
    try:
        fields["layers"] = [LayerDecision(**d) for d in fields.get("layers", [])]
        return FactorizeReport(**fields)
    except TypeError:  # written by another version: the plan alone still rebuilds the model
        return None
