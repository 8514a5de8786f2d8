"""Export a PyTorch model to one checked ONNX file, written atomically.

``export_onnx`` tries the torch.export-based ("dynamo") exporter first and falls back to the TorchScript
one, recording why (or tries the exporters in the order given). A failed attempt prints nothing (the
dynamo exporter would print the whole ATen graph); one log line says which exporter was used instead and
why. The result is checked (``onnx.checker`` with ``full_check``, strict shape inference) before it is
moved into place atomically; weights stay inside the file unless they exceed protobuf's 2 GB limit, in
which case they go to one ``<name>.data`` file beside it.

The exporters themselves are in ``exporters``; reading the result's graph is ``onnx_graph``.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from ..errors import ExportError, one_line
from ..files.atomic import check_writable, publish
from ..inputs import as_input_tuple
from .exporters import ExportSpec, export_checked, exporters_to_try
from .onnx_graph import default_opset, onnx_node_counts, value_shape

__all__ = [
    "ExportResult",
    "export_onnx",
]

# Protobuf cannot serialize a message of 2 GiB or more; keep a margin for the graph itself.
_EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


# -- export -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportResult:
    """What ``export_onnx`` wrote and how.

    Attributes:
        path: the ``.onnx`` file.
        exporter: ``"dynamo"`` or ``"torchscript"``, the one that produced the file.
        fallback_reason: why the first exporter tried was not used (when it fell back), else None.
        opset: the default-domain opset of the file.
        file_size: bytes on disk, external data included.
        external_data_path: the ``<name>.data`` weights file, or None when the file is self-contained.
        node_counts: number of nodes per op type (``"com.microsoft::X"`` for non-standard domains).
        input_names, output_names: graph input and output names, in call order.
        output_shapes: inferred output shapes; a str is a symbolic dim such as ``"batch"``.
        dynamic_batch: whether axis 0 of every input is symbolic in the file (the exporter may have to
            fix it, e.g. for a model that reshapes with a literal batch size; ``notes`` then says so).
        seconds: wall time of the export including the checks.
        notes: things the caller should know, one line each.
    """

    path: Path
    exporter: str
    fallback_reason: str | None
    opset: int
    file_size: int
    external_data_path: Path | None
    node_counts: dict[str, int]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    output_shapes: tuple[tuple[int | str | None, ...], ...]
    dynamic_batch: bool
    seconds: float
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field (paths as strings)."""
        return {
            "path": str(self.path),
            "exporter": self.exporter,
            "fallback_reason": self.fallback_reason,
            "opset": self.opset,
            "file_size": self.file_size,
            "external_data_path": None if self.external_data_path is None else str(self.external_data_path),
            "node_counts": dict(self.node_counts),
            "input_names": list(self.input_names),
            "output_names": list(self.output_names),
            "output_shapes": [list(s) for s in self.output_shapes],
            "dynamic_batch": self.dynamic_batch,
            "seconds": self.seconds,
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        how = self.exporter
        if self.fallback_reason is not None:
            how += f" (fallback: {self.fallback_reason})"
        ops = ", ".join(f"{op} {n}" for op, n in self.node_counts.items())
        return (f"{self.path}: {self.file_size / 1e6:.2f} MB, opset {self.opset}, exporter {how}, "
                f"{self.seconds:.2f} s; nodes: {ops}")


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    exporter: str | Sequence[str] = "auto",
    force: bool = False,
    external_data: bool | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> ExportResult:
    """Export ``model`` to a checked ONNX file at ``path``, written atomically.

    The model is exported in eval mode; its training flags are restored afterwards and its weights
    are not touched.

    Args:
        model: the module (or torch.fx GraphModule) to export.
        example_inputs: a tensor or a tuple of tensors, as the model is called.
        path: the ``.onnx`` file to write.
        opset: default-domain opset; None lets the exporter choose.
        dynamic_batch: export axis 0 of every input and output as the symbolic dim ``batch``.
        exporter: ``"dynamo"`` (torch.export based), ``"torchscript"``, ``"auto"``: dynamo, and
            TorchScript if dynamo fails, or a sequence of exporter names tried in that order (see
            ``exporter_order``). The reason for a fallback is kept in the result and logged as one line.
        force: overwrite an existing file.
        external_data: put weights in ``<name>.data``; None decides by size (only above 2 GB).
        input_names, output_names: graph names; by default the forward's parameter names and
            ``output`` (``output_0``, ``output_1``, ... for several outputs).
    Returns:
        An ``ExportResult``.
    Raises:
        ExportError: the export failed, or the ONNX checker or shape inference rejected the result.
        OutputExistsError: ``path`` exists and ``force`` is False.
        InputSpecError: the example inputs are not tensors.
    """
    order = exporters_to_try(exporter)
    if not isinstance(model, nn.Module):
        raise ExportError(f"export_onnx needs an nn.Module, got {type(model).__name__}")
    path = check_writable(path, force)
    args = as_input_tuple(example_inputs)
    weight_bytes = _weight_bytes(model)
    if external_data is None:
        external_data = weight_bytes > _EXTERNAL_DATA_THRESHOLD
    elif not external_data and weight_bytes > _EXTERNAL_DATA_THRESHOLD:
        raise ExportError(f"the model has {weight_bytes / 2**30:.1f} GiB of weights, more than fits in one "
                          "ONNX file (2 GiB); use external_data=True")
    data_path = path.with_name(path.name + ".data") if external_data else None
    if data_path is not None:
        check_writable(data_path, force)

    started = time.perf_counter()
    with _eval_mode(model):
        n_outputs = _count_outputs(model, args)
        names_in = list(input_names) if input_names is not None else _default_input_names(model, len(args))
        names_out = list(output_names) if output_names is not None else _default_output_names(n_outputs)
        _check_names(names_in, len(args), "input")
        _check_names(names_out, n_outputs, "output")
        spec = ExportSpec(model, args, names_in, names_out, opset, dynamic_batch, external_data)
        try:  # beside the destination, so that publishing is a rename on one filesystem
            staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.export-"))
        except OSError as error:
            raise ExportError(f"cannot write in {path.parent}: {error.strerror or error}") from None
        try:
            staged, used, fallback_reason = export_checked(spec, staging / path.name, order)
            graph = _inferred_graph_model(staged, staging)
            staged_data = staged.with_name(path.name + ".data")
            if data_path is not None and not staged_data.exists():
                data_path = None  # every tensor was small enough to stay inline
            _publish_model(staged, path, staged_data if data_path is not None else None, data_path, force)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - started

    size = path.stat().st_size + (data_path.stat().st_size if data_path is not None else 0)
    input_shapes = [value_shape(i) for i in graph.graph.input]
    exported_dynamic = all(isinstance(shape[0], str) for shape in input_shapes if shape)
    notes = []
    if dynamic_batch and not exported_dynamic:
        notes.append(f"the {used} exporter fixed the batch axis (input shapes {[list(s) for s in input_shapes]}): "
                     "the model ties its computation to the example's batch size")
    return ExportResult(
        path=path,
        exporter=used,
        fallback_reason=fallback_reason,
        opset=default_opset(graph),
        file_size=size,
        external_data_path=data_path,
        node_counts=onnx_node_counts(graph),
        input_names=tuple(i.name for i in graph.graph.input),
        output_names=tuple(o.name for o in graph.graph.output),
        output_shapes=tuple(value_shape(o) for o in graph.graph.output),
        dynamic_batch=exported_dynamic,
        seconds=seconds,
        notes=tuple(notes),
    )


def _publish_model(staged: Path, path: Path, staged_data: Path | None, data_path: Path | None,
                   force: bool) -> None:
    """Move the weights file, then the model file that references it, into place."""
    if staged_data is None or data_path is None:
        publish(staged, path, force)
        return
    publish(staged_data, data_path, force)
    try:
        publish(staged, path, force)
    except BaseException:
        if not force:  # the .data file was created by us a moment ago and belongs to no model
            data_path.unlink(missing_ok=True)
        raise


def _inferred_graph_model(staged: Path, staging: Path) -> onnx.ModelProto:
    """The staged model after strict shape inference, without its weights (graph structure only)."""
    inferred = staging / ("inferred-" + staged.name)
    try:
        onnx.shape_inference.infer_shapes_path(str(staged), str(inferred), check_type=True, strict_mode=True)
    except Exception as error:
        raise ExportError(f"ONNX shape inference failed on the export: {one_line(error, with_type=True)}") from error
    return onnx.load(str(inferred), load_external_data=False)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, restoring each one's own training flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _count_outputs(model: nn.Module, args: tuple[torch.Tensor, ...]) -> int:
    try:
        with torch.no_grad():
            outputs = model(*args)
    except Exception as error:
        raise ExportError(f"the model fails on the example inputs: {one_line(error, with_type=True)}") from error
    leaves = torch.utils._pytree.tree_leaves(outputs)
    if not leaves or not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
        raise ExportError("the model must return a tensor or a (nested) tuple/list/dict of tensors")
    return len(leaves)


def _default_input_names(model: nn.Module, count: int) -> list[str]:
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [p.name for p in params
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= count:
        return positional[:count]
    return ["input"] if count == 1 else [f"input_{i}" for i in range(count)]


def _default_output_names(count: int) -> list[str]:
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def _check_names(names: list[str], count: int, what: str) -> None:
    if len(names) != count or len(set(names)) != len(names):
        raise ExportError(f"need {count} distinct {what} names, got {names}")


def _weight_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen:  # tied weights are stored once
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total
