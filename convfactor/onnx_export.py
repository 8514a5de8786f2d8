"""Export a PyTorch model to one checked ONNX file, and get ONNX models ready to run in onnxruntime.

``export_onnx`` tries the torch.export-based ("dynamo") exporter first and falls back to the TorchScript
one, recording why (or tries the exporters in the order given). A failed attempt prints nothing (the
dynamo exporter would print the whole ATen graph); one log line says which exporter was used instead and
why. The result is checked (``onnx.checker`` with ``full_check``, strict shape inference) before it is
moved into place atomically; weights stay inside the file unless they exceed protobuf's 2 GB limit, in
which case they go to one ``<name>.data`` file beside it.

The helpers below (``prepare_onnx``, ``make_session``, ``session_feeds``, ``standard_normal_inputs``)
are shared by the fidelity check, the benchmark and the profiler, which all accept either a module
(exported here) or a path to an ``.onnx`` file.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from ._atomic import check_writable, publish
from ._quiet import quiet
from .errors import ConvfactorError, ExportError

__all__ = [
    "InputSpecError",
    "ExportResult",
    "ConvNode",
    "PreparedModel",
    "EXPORTERS",
    "GRAPH_OPTIMIZATION_LEVELS",
    "STANDARD_DOMAINS",
    "export_onnx",
    "onnx_node_counts",
    "nonstandard_ops",
    "conv_nodes",
    "as_input_tuple",
    "input_shapes",
    "standard_normal_inputs",
    "prepare_onnx",
    "make_session",
    "session_feeds",
    "run_checked",
]

EXPORTERS = ("auto", "dynamo", "torchscript")
_AUTO_ORDER = ("dynamo", "torchscript")
_log = logging.getLogger(__name__)
STANDARD_DOMAINS = ("", "ai.onnx")
# Protobuf cannot serialize a message of 2 GiB or more; keep a margin for the graph itself.
_EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
GRAPH_OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")


class InputSpecError(ConvfactorError, ValueError):
    """Example inputs, an input shape or an ONNX path given by the user cannot be used."""


# -- inputs -----------------------------------------------------------------------------------------


def as_input_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """Normalize example inputs (a tensor, an array, or a tuple/list of them) to a tuple of tensors.

    Raises:
        InputSpecError: an element is neither a tensor nor a numpy array, or nothing was given.
    """
    items = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not items:
        raise InputSpecError("no example inputs given")
    tensors = []
    for i, item in enumerate(items):
        if isinstance(item, np.ndarray):
            item = torch.from_numpy(np.ascontiguousarray(item))
        if not isinstance(item, torch.Tensor):
            raise InputSpecError(
                f"example input {i} is a {type(item).__name__}; give tensors or numpy arrays "
                "(a tuple of them for a model with several inputs)"
            )
        tensors.append(item)
    return tuple(tensors)


def input_shapes(input_shape: Sequence[int] | Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    """Normalize ``(1, 3, 224, 224)`` or ``[(1, 3, 224, 224), (1, 10)]`` to a tuple of shapes.

    Raises:
        InputSpecError: a dimension is not a positive int.
    """
    shapes = input_shape
    if len(shapes) == 0:
        raise InputSpecError("input_shape is empty")
    if all(isinstance(d, (int, np.integer)) for d in shapes):
        shapes = (shapes,)
    result = []
    for shape in shapes:
        if not isinstance(shape, (tuple, list)) or not shape or not all(
            isinstance(d, (int, np.integer)) and d > 0 for d in shape
        ):
            raise InputSpecError(f"input_shape {list(input_shape)!r}: give positive ints, e.g. (1, 3, 224, 224)")
        result.append(tuple(int(d) for d in shape))
    return tuple(result)


def standard_normal_inputs(shapes: Sequence[Sequence[int]], seed: int = 0) -> tuple[np.ndarray, ...]:
    """Float32 standard-normal arrays of the given shapes, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(tuple(shape), dtype=np.float32) for shape in shapes)


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
    order = _exporters(exporter)
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
        spec = _ExportSpec(model, args, names_in, names_out, opset, dynamic_batch, external_data)
        try:  # beside the destination, so that publishing is a rename on one filesystem
            staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.export-"))
        except OSError as error:
            raise ExportError(f"cannot write in {path.parent}: {error.strerror or error}") from None
        try:
            staged, used, fallback_reason = _export_checked(spec, staging / path.name, order)
            graph = _inferred_graph_model(staged, staging)
            staged_data = staged.with_name(path.name + ".data")
            if data_path is not None and not staged_data.exists():
                data_path = None  # every tensor was small enough to stay inline
            _publish_model(staged, path, staged_data if data_path is not None else None, data_path, force)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - started

    size = path.stat().st_size + (data_path.stat().st_size if data_path is not None else 0)
    input_shapes = [_value_shape(i) for i in graph.graph.input]
    exported_dynamic = all(isinstance(shape[0], str) for shape in input_shapes if shape)
    notes = []
    if dynamic_batch and not exported_dynamic:
        notes.append(f"the {used} exporter fixed the batch axis (input shapes {[list(s) for s in input_shapes]}): "
                     "the model ties its computation to the example's batch size")
    return ExportResult(
        path=path,
        exporter=used,
        fallback_reason=fallback_reason,
        opset=_default_opset(graph),
        file_size=size,
        external_data_path=data_path,
        node_counts=onnx_node_counts(graph),
        input_names=tuple(i.name for i in graph.graph.input),
        output_names=tuple(o.name for o in graph.graph.output),
        output_shapes=tuple(_value_shape(o) for o in graph.graph.output),
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


@dataclass
class _ExportSpec:
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


def _exporters(exporter: str | Sequence[str]) -> tuple[str, ...]:
    """``exporter`` as the tuple of exporters to try in order."""
    if isinstance(exporter, str):
        return exporter_order(exporter) if exporter == "auto" else (exporter_order(exporter)[0],)
    order = tuple(exporter)
    unknown = [e for e in order if e not in _AUTO_ORDER]
    if not order or unknown or len(set(order)) != len(order):
        raise ExportError(f"exporter order {list(order)!r}: give distinct names among {', '.join(_AUTO_ORDER)}")
    return order


def _export_checked(spec: _ExportSpec, staged: Path, order: tuple[str, ...]) -> tuple[Path, str, str | None]:
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


def _export_one(spec: _ExportSpec, staged: Path, exporter: str) -> Path:
    try:
        with quiet():
            if exporter == "dynamo":
                _export_dynamo(spec, staged)
            else:
                _export_torchscript(spec, staged)
    except ExportError:
        raise
    except Exception as error:
        raise ExportError(f"{exporter} export failed: {_one_line(_root_cause(error))}") from error
    _normalize_external_data(staged, spec.external_data)
    try:
        onnx.checker.check_model(str(staged), full_check=True)
    except Exception as error:
        raise ExportError(f"the ONNX checker rejected the {exporter} export: {_one_line(error)}") from error
    return staged


def _export_dynamo(spec: _ExportSpec, staged: Path) -> None:
    dynamic_shapes = None
    if spec.dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} if a.dim() > 0 else None for a in spec.args)
    program = torch.onnx.export(
        spec.model,
        spec.args,
        None,  # write it ourselves: torch would put the weights in a .data file even for a tiny model
        dynamo=True,
        opset_version=spec.opset,
        input_names=spec.input_names,
        output_names=spec.output_names,
        dynamic_shapes=dynamic_shapes,
        verbose=False,
    )
    program.save(str(staged), external_data=spec.external_data)


def _export_torchscript(spec: _ExportSpec, staged: Path) -> None:
    dynamic_axes = None
    if spec.dynamic_batch:
        dynamic_axes = {name: {0: "batch"} for name, a in zip(spec.input_names, spec.args) if a.dim() > 0}
        dynamic_axes.update({name: {0: "batch"} for name in spec.output_names})
    with _tensor_arguments_only(spec.model, len(spec.args)):
        torch.onnx.export(
            spec.model,
            spec.args,
            str(staged),
            dynamo=False,
            opset_version=spec.opset,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
            verbose=False,
        )


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
        for tensor in _all_initializers(graph_only.graph)
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


def _inferred_graph_model(staged: Path, staging: Path) -> onnx.ModelProto:
    """The staged model after strict shape inference, without its weights (graph structure only)."""
    inferred = staging / ("inferred-" + staged.name)
    try:
        onnx.shape_inference.infer_shapes_path(str(staged), str(inferred), check_type=True, strict_mode=True)
    except Exception as error:
        raise ExportError(f"ONNX shape inference failed on the export: {_one_line(error)}") from error
    return onnx.load(str(inferred), load_external_data=False)


def _clear_directory(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


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
        raise ExportError(f"the model fails on the example inputs: {_one_line(error)}") from error
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


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _one_line(error: BaseException) -> str:
    text = _ANSI.sub("", str(error)).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception ``error`` was raised from (torch.onnx wraps the real reason in two layers)."""
    seen = {id(error)}
    while (inner := error.__cause__ or error.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        error = inner
    return error


# -- graph inspection -------------------------------------------------------------------------------


def _all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from _all_graphs(sub)


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for sub in _all_graphs(graph):
        yield from sub.node


def _all_initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    for sub in _all_graphs(graph):
        yield from sub.initializer


def _as_model(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(str(model), load_external_data=False)


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in STANDARD_DOMAINS else f"{node.domain}::{node.op_type}"


def onnx_node_counts(model: onnx.ModelProto | str | os.PathLike) -> dict[str, int]:
    """Nodes per op type, subgraphs included, most frequent first (``"domain::Op"`` off the standard domain)."""
    counts = Counter(_op_key(node) for node in _all_nodes(_as_model(model).graph))
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def nonstandard_ops(model: onnx.ModelProto | str | os.PathLike) -> list[str]:
    """``"domain::Op"`` of every node outside the standard ONNX domain (sorted, unique); empty is good."""
    return sorted({_op_key(node) for node in _all_nodes(_as_model(model).graph)
                   if node.domain not in STANDARD_DOMAINS})


@dataclass(frozen=True)
class ConvNode:
    """One ONNX ``Conv`` node: its name, ``group``, kernel, and weight shape when known."""

    name: str
    group: int
    kernel_shape: tuple[int, ...]
    weight_shape: tuple[int, ...] | None = field(default=None)


def conv_nodes(model: onnx.ModelProto | str | os.PathLike) -> list[ConvNode]:
    """Every standard-domain ``Conv`` node with its ``group`` and kernel shape, in graph order."""
    proto = _as_model(model)
    shapes = {t.name: tuple(t.dims) for t in _all_initializers(proto.graph)}
    result = []
    for node in _all_nodes(proto.graph):
        if node.op_type != "Conv" or node.domain not in STANDARD_DOMAINS:
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weight_shape = shapes.get(node.input[1]) if len(node.input) > 1 else None
        kernel = attributes.get("kernel_shape")
        if kernel is None and weight_shape is not None:
            kernel = weight_shape[2:]
        result.append(ConvNode(node.name, int(attributes.get("group", 1)), tuple(kernel or ()), weight_shape))
    return result


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in STANDARD_DOMAINS:
            return int(entry.version)
    raise ExportError("the exported model declares no default-domain opset")


def _value_shape(value: onnx.ValueInfoProto) -> tuple[int | str | None, ...]:
    dims = value.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims)


# -- running ONNX models ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedModel:
    """An ONNX file ready for onnxruntime, and the module it came from when there was one."""

    path: Path
    module: nn.Module | None
    export: ExportResult | None

    def to_dict(self, kept: bool = True) -> dict[str, Any]:
        """Where the ONNX file is and how it was made.

        Args:
            kept: False when the export went to a temporary directory that no longer exists; its
                path is then reported as None.
        """
        exported = self.module is not None
        info: dict[str, Any] = {"given_as": "module" if exported else "onnx",
                                "path": str(self.path) if kept or not exported else None}
        if self.export is not None:
            info["exporter"] = self.export.exporter
            info["fallback_reason"] = self.export.fallback_reason
            info["opset"] = self.export.opset
        return info


def prepare_onnx(
    model: nn.Module | str | os.PathLike,
    example_inputs: Any,
    directory: str | os.PathLike,
    name: str,
    *,
    exporter: str = "auto",
    opset: int | None = None,
) -> PreparedModel:
    """A module exported to ``directory/name.onnx``, or an existing ONNX path checked and passed through.

    Raises:
        InputSpecError: a path that does not exist or is not an ONNX model, or neither path nor module.
        ExportError: the export failed.
    """
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise InputSpecError(f"ONNX model {path} does not exist")
        try:
            onnx.load(str(path), load_external_data=False)
        except Exception as error:
            raise InputSpecError(f"{path} is not an ONNX model: {_one_line(error)}") from None
        return PreparedModel(path, None, None)
    if not isinstance(model, nn.Module):
        raise InputSpecError(f"expected an nn.Module or a path to an .onnx file, got {type(model).__name__}")
    result = export_onnx(model, example_inputs, Path(directory) / f"{name}.onnx", exporter=exporter,
                         opset=opset, force=True)
    return PreparedModel(result.path, model, result)


def make_session(
    path: str | os.PathLike,
    *,
    threads: int | None = None,
    graph_optimization: str = "all",
    enable_profiling: bool = False,
    profile_prefix: str | None = None,
    optimized_model_path: str | os.PathLike | None = None,
):
    """An onnxruntime CPU session with explicit threading and graph-optimization settings.

    Args:
        path: the ONNX file.
        threads: intra-op threads; None lets onnxruntime use every core. Inter-op threads are 1 and
            execution is sequential, as for single-stream latency.
        graph_optimization: one of ``GRAPH_OPTIMIZATION_LEVELS``.
        enable_profiling: write onnxruntime's JSON trace (see ``session.end_profiling()``).
        profile_prefix: path prefix of the trace file.
        optimized_model_path: also save the optimized graph there (weights in a side file).
    Returns:
        An ``onnxruntime.InferenceSession``.
    Raises:
        InputSpecError: an unknown optimization level or a non-positive thread count.
    """
    import onnxruntime as ort

    levels = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if graph_optimization not in levels:
        raise InputSpecError(f"unknown graph_optimization {graph_optimization!r}; "
                             f"choose one of {', '.join(GRAPH_OPTIMIZATION_LEVELS)}")
    if threads is not None and threads < 1:
        raise InputSpecError(f"threads must be >= 1, got {threads}")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[graph_optimization]
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: the NCHWc "hardware specific" notice is expected
    if enable_profiling:
        options.enable_profiling = True
        if profile_prefix is not None:
            options.profile_file_prefix = str(profile_prefix)
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
        # Weights to a side file: only the graph structure is read back.
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         Path(optimized_model_path).name + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         "1024")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise InputSpecError(f"onnxruntime cannot load {path}: {_one_line(error)}") from None


_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def session_feeds(session, inputs: Sequence[Any]) -> dict[str, np.ndarray]:
    """Map positional inputs (tensors or arrays) to the session's input names and dtypes.

    Raises:
        InputSpecError: the number of inputs or a rank does not match the model.
    """
    expected = session.get_inputs()
    if len(inputs) != len(expected):
        names = ", ".join(i.name for i in expected)
        raise InputSpecError(f"the model takes {len(expected)} input(s) ({names}) but {len(inputs)} were given; "
                             "a batch must hold only the model's inputs (e.g. x of (x, y))")
    feeds = {}
    for meta, value in zip(expected, inputs):
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if len(meta.shape) != array.ndim:
            raise InputSpecError(f"input {meta.name!r} has rank {len(meta.shape)} {list(meta.shape)} "
                                 f"but an array of shape {list(array.shape)} was given")
        dtype = _ORT_TYPES.get(meta.type)
        feeds[meta.name] = np.ascontiguousarray(array if dtype is None else array.astype(dtype, copy=False))
    return feeds


def run_checked(session, feeds: dict[str, np.ndarray], label: str) -> list[np.ndarray]:
    """``session.run(None, feeds)``, with onnxruntime's failure turned into a one-line user error.

    Raises:
        InputSpecError: the inputs do not fit the model (shape, static batch size, ...).
    """
    try:
        return session.run(None, feeds)
    except Exception as error:
        shapes = ", ".join(f"{name} {list(value.shape)}" for name, value in feeds.items())
        raise InputSpecError(f"onnxruntime cannot run {label} on inputs {shapes}: {_one_line(error)}") from None
