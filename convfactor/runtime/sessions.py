"""ONNX models ready to run in onnxruntime: a module exported (or an ``.onnx`` path), its session, its feeds.

Shared by the fidelity check, the benchmark and the profiler, which all accept either a module
(exported here with ``export_onnx``) or a path to an ``.onnx`` file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import InputSpecError, one_line
from .export import ExportResult, export_onnx

__all__ = ["GRAPH_OPTIMIZATION_LEVELS", "PreparedModel", "prepare_onnx", "make_session", "session_feeds",
           "run_checked"]

GRAPH_OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")



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
            raise InputSpecError(f"{path} is not an ONNX model: {one_line(error, with_type=True)}") from None
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
        raise InputSpecError(f"onnxruntime cannot load {path}: {one_line(error, with_type=True)}") from None



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
        reason = one_line(error, with_type=True)
        raise InputSpecError(f"onnxruntime cannot run {label} on inputs {shapes}: {reason}") from None
