"""The two ONNX exporters behind ``export_onnx``, tried in order, each result checked.

The torch.export-based ("dynamo") exporter and the TorchScript one take the same spec; a failure of
one is a reason to try the next (``export_checked``), and one log line says which was used instead and
why. Both write the same weight layout: inline, or all in one ``<name>.data`` file.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from ..errors import ExportError, one_line
from .onnx_graph import all_initializers
from .quiet import quiet

__all__ = ["EXPORTERS", "ExportSpec", "exporter_order", "exporters_to_try", "export_checked"]


EXPORTERS = ("auto", "dynamo", "torchscript")



_AUTO_ORDER = ("dynamo", "torchscript")



_log = logging.getLogger(__name__)



@dataclass
class ExportSpec:
    """What to export and how: the model in eval mode, its inputs, graph names and options."""

    model: nn.Module
    args: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    opset: int | None
    dynamic_batch: bool
    external_data: bool



def exporter_order(first: str) -> tuple[str, ...]:
    """The exporters to try, ``first`` first and the other one as its fallback ("auto": dynamo first).

    Raises:
        ExportError: an unknown exporter name.
    """
    if first not in EXPORTERS:
        raise ExportError(f"unknown exporter {first!r}; choose one of {', '.join(EXPORTERS)}")
    if first == "auto":
        return _AUTO_ORDER
    return (first, *(e for e in _AUTO_ORDER if e != first))



def exporters_to_try(exporter: str | Sequence[str]) -> tuple[str, ...]:
    """``exporter`` as the tuple of exporters to try in order."""
    if isinstance(exporter, str):
        return exporter_order(exporter) if exporter == "auto" else (exporter_order(exporter)[0],)
    order = tuple(exporter)
    unknown = [e for e in order if e not in _AUTO_ORDER]
    if not order or unknown or len(set(order)) != len(order):
        raise ExportError(f"exporter order {list(order)!r}: give distinct names among {', '.join(_AUTO_ORDER)}")
    return order



def export_checked(spec: ExportSpec, staged: Path, order: tuple[str, ...]) -> tuple[Path, str, str | None]:
    """Export into ``staged`` with the first exporter of ``order`` that succeeds, and check the file.

    Returns:
        The staged file, the exporter used, and why the ones before it failed (None when the first one worked).
    """
    failures: list[str] = []
    for exporter in order:
        try:
            staged_path = _export_one(spec, staged, exporter)
        except ExportError as error:  # any failure is a reason to try the next exporter
            if len(order) == 1:
                raise
            failures.append(str(error))
            _clear_directory(staged.parent)
            continue
        reason = "; ".join(failures) or None
        if reason is not None:
            _log.warning("ONNX export: %s; used the %s exporter instead", reason, exporter)
        return staged_path, exporter, reason
    raise ExportError(f"every exporter failed: {'; '.join(failures)}")



def _export_one(spec: ExportSpec, staged: Path, exporter: str) -> Path:
    try:
        with quiet():
            if exporter == "dynamo":
                _export_dynamo(spec, staged)
            else:
                _export_torchscript(spec, staged)
    except ExportError:
        raise
    except Exception as error:
        raise ExportError(f"{exporter} export failed: {one_line(_root_cause(error), with_type=True)}") from error
    _normalize_external_data(staged, spec.external_data)
    try:
        onnx.checker.check_model(str(staged), full_check=True)
    except Exception as error:
        reason = one_line(error, with_type=True)
        raise ExportError(f"the ONNX checker rejected the {exporter} export: {reason}") from error
    return staged



def _common_arguments(spec: ExportSpec) -> dict:
    """The ``torch.onnx.export`` arguments both exporters take alike."""
    return {"opset_version": spec.opset, "input_names": spec.input_names, "output_names": spec.output_names,
            "verbose": False}



def _export_dynamo(spec: ExportSpec, staged: Path) -> None:
    dynamic_shapes = None
    if spec.dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} if a.dim() > 0 else None for a in spec.args)
    # No path: we write it ourselves, as torch would put the weights in a .data file even for a tiny model.
    program = torch.onnx.export(spec.model, spec.args, None, dynamo=True, dynamic_shapes=dynamic_shapes,
                                **_common_arguments(spec))
    program.save(str(staged), external_data=spec.external_data)



def _export_torchscript(spec: ExportSpec, staged: Path) -> None:
    dynamic_axes = None
    if spec.dynamic_batch:
        dynamic_axes = {name: {0: "batch"} for name, a in zip(spec.input_names, spec.args) if a.dim() > 0}
        dynamic_axes.update({name: {0: "batch"} for name in spec.output_names})
    with _tensor_arguments_only(spec.model, len(spec.args)):
        torch.onnx.export(spec.model, spec.args, str(staged), dynamo=False, dynamic_axes=dynamic_axes,
                          do_constant_folding=True, **_common_arguments(spec))



@contextlib.contextmanager
def _tensor_arguments_only(model: nn.Module, count: int) -> Iterator[None]:
    """Show the TorchScript exporter a ``forward`` of the first ``count`` arguments only.

    It would pass every other argument's default as a traced input: ``embed=False`` becomes a tensor,
    ``mode="fast"`` fails. The module itself (and so every scope and weight name) is unchanged.
    """
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        yield
        return
    params = list(signature.parameters.values())
    if len(params) <= count or any(p.kind == p.VAR_POSITIONAL for p in params[:count]):
        yield
        return
    bound = model.forward

    def forward(*args: Any) -> Any:
        return bound(*args)

    forward.__signature__ = signature.replace(parameters=params[:count])  # type: ignore[attr-defined]
    model.__dict__["forward"] = forward
    try:
        yield
    finally:
        model.__dict__.pop("forward", None)



def _normalize_external_data(staged: Path, external_data: bool) -> None:
    """Rewrite ``staged`` so its weights are inline, or all in ``<name>.data``, as requested.

    The dynamo exporter chooses by its own size rule, the TorchScript one writes one file per tensor
    for large models; this gives both the same layout.
    """
    graph_only = onnx.load(str(staged), load_external_data=False)
    locations = {
        entry.value
        for tensor in all_initializers(graph_only.graph)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    wanted = {staged.name + ".data"} if external_data else set()
    if locations == wanted or (external_data and not locations and not graph_only.graph.initializer):
        return
    full = onnx.load(str(staged))  # pulls in external tensors
    for name in locations:
        (staged.parent / name).unlink(missing_ok=True)
    if external_data:
        onnx.save_model(full, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=staged.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(full, str(staged))



def _clear_directory(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)



def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception ``error`` was raised from (torch.onnx wraps the real reason in two layers)."""
    seen = {id(error)}
    while (inner := error.__cause__ or error.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        error = inner
    return error
