"""int8 ONNX models with onnxruntime's own quantization tools, and a record of what was done.

``quantize_onnx`` takes a module (exported first with ``prepare_onnx``) or an ``.onnx`` file and writes an
int8 model atomically:

  1. ``onnxruntime.quantization.shape_inference.quant_pre_process``: symbolic shape inference and
     onnxruntime's graph optimization (BatchNorm folding, constant folding), as onnxruntime recommends
     before quantizing. A step that fails is skipped and named in the notes.
  2. With calibration data: ``quantize_static`` in QDQ format, int8 weights per output channel,
     activation ranges from the calibration batches (``minmax``, ``entropy`` or ``percentile``),
     uint8 activations by default (measured faster than int8 here; see ``docs/int8.md``), 7-bit weights
     on x86 CPUs without VNNI (``reduce_range``: full-range weights saturate onnxruntime's AVX2 kernels).
     Without: ``quantize_dynamic`` (int8 weights, activations quantized at run time
     by ``DynamicQuantizeLinear``), and the result says so.

The counts in the result are read back from the written graph (``quantized_graph``), not assumed.

Example::

    result = quantize_onnx(model, "fast.int8.onnx", calibration=x_train[:128], example_inputs=x[:1])
    print(result)   # how it was quantized, the quantized and float nodes, the bits, the file sizes
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import ConvfactorError, InputSpecError, one_line
from ..files.atomic import check_writable, publish
from ..inputs import as_input_tuple
from .cpu import cpu_flags
from .quantized_graph import GraphBits, float_compute_nodes, graph_bits, quantized_nodes
from .sessions import prepare_onnx

__all__ = ["QUANTIZE_TYPES", "CALIBRATE_METHODS", "ACTIVATION_TYPES", "QuantizeResult", "quantize_onnx",
           "needs_reduced_range"]

QUANTIZE_TYPES = ("int8",)  # what --quantize / sweep(quantize=...) accept
CALIBRATE_METHODS = ("minmax", "entropy", "percentile")
ACTIVATION_TYPES = ("uint8", "int8")
DEFAULT_CALIBRATION_BATCH = 16
# The channel axis of a normalization's scale: (C,) for Batch/InstanceNormalization, the normalized (last)
# dimensions for LayerNormalization. onnxruntime's QDQ quantizer asks for axis 1 (an activation's channel
# axis), finds it out of range of a 1-D scale, logs "Axis 1 is out-of-range for weight ..." and quantizes the
# scale per tensor. A BatchNorm that pre-processing cannot fold (one after a ReLU, as in CREPE) and the
# LayerNorms of a transformer neck (PP-OCRv4 rec) reach the quantizer; with these axes their scales are
# quantized per channel, as ``per_channel`` asks.
NORM_SCALE_AXIS = {"BatchNormalization": 0, "InstanceNormalization": 0, "LayerNormalization": -1}


@dataclass(frozen=True)
class QuantizeResult:
    """What ``quantize_onnx`` wrote and how.

    Attributes:
        path: the int8 ``.onnx`` file.
        mode: ``"static"`` (calibrated, QDQ) or ``"dynamic"`` (no calibration data: activation ranges
            computed at run time, integer ops).
        format: ``"QDQ"`` or ``"integer ops"``.
        per_channel: weights quantized per output channel.
        reduce_range: weights quantized to 7 bits (stored as int8; see ``quantize_onnx``).
        weight_type, activation_type: ``"int8"``/``"uint8"`` (dynamic: activations are uint8 at run time).
        calibrate_method: the static range method, None for dynamic.
        calibration_samples, calibration_batches: what the ranges were computed on (0 for dynamic).
        quantized_nodes: nodes per op type read from the written graph (compute ops and Q/DQ nodes).
        float_compute_nodes: Conv/Gemm/MatMul nodes left in float, per op type.
        kept_float: the nodes excluded on request (``keep_float``), by name.
        bits: weight and activation bits counted from the graph.
        float_file_size, file_size: bytes of the float input and of the int8 output.
        notes: what the caller should know, one line each (dynamic fallback, skipped pre-processing).
    """

    path: Path
    mode: str
    format: str
    per_channel: bool
    reduce_range: bool
    weight_type: str
    activation_type: str
    calibrate_method: str | None
    calibration_samples: int
    calibration_batches: int
    quantized_nodes: dict[str, int]
    float_compute_nodes: dict[str, int]
    kept_float: tuple[str, ...]
    bits: GraphBits
    float_file_size: int
    file_size: int
    seconds: float
    notes: tuple[str, ...] = field(default=())

    @property
    def quantized_compute(self) -> int:
        """Compute nodes that run quantized (Q/DQ nodes themselves not counted)."""
        skip = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
        return sum(n for op, n in self.quantized_nodes.items() if op not in skip)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field."""
        return {"path": str(self.path), "mode": self.mode, "format": self.format, "per_channel": self.per_channel,
                "reduce_range": self.reduce_range,
                "weight_type": self.weight_type, "activation_type": self.activation_type,
                "calibrate_method": self.calibrate_method, "calibration_samples": self.calibration_samples,
                "calibration_batches": self.calibration_batches, "quantized_nodes": dict(self.quantized_nodes),
                "quantized_compute": self.quantized_compute, "float_compute_nodes": dict(self.float_compute_nodes),
                "kept_float": list(self.kept_float), "bits": self.bits.to_dict(),
                "float_file_size": self.float_file_size, "file_size": self.file_size, "seconds": self.seconds,
                "notes": list(self.notes)}

    def __str__(self) -> str:
        how = (f"static {self.format}, {self.calibrate_method} ranges on {self.calibration_samples} samples"
               if self.mode == "static" else "dynamic (no calibration data: activation ranges at run time)")
        ops = ", ".join(f"{op} {n}" for op, n in self.quantized_nodes.items()) or "none"
        kept = ", ".join(f"{op} {n}" for op, n in self.float_compute_nodes.items()) or "none"
        return (f"{self.path}: {how}; {self.weight_type} weights{' per channel' if self.per_channel else ''}, "
                f"{self.activation_type} activations; quantized: {ops}; float compute nodes: {kept}; "
                f"bits w {self.bits.weight_bits:g} / a {self.bits.activation_bits}; "
                f"{self.float_file_size / 1e6:.2f} -> {self.file_size / 1e6:.2f} MB")


def quantize_onnx(
    model_or_onnx_path: nn.Module | str | os.PathLike,
    out_path: str | os.PathLike,
    calibration: Any = None,
    *,
    example_inputs: Any = None,
    per_channel: bool = True,
    calibrate_method: str = "minmax",
    activation_type: str = "uint8",
    reduce_range: bool | str = "auto",
    keep_float: Sequence[str] = (),
    calibration_batch: int = DEFAULT_CALIBRATION_BATCH,
    preprocess: bool = True,
    force: bool = False,
    exporter: str = "auto",
) -> QuantizeResult:
    """Quantize a model to int8 with onnxruntime and write it to ``out_path`` atomically.

    Args:
        model_or_onnx_path: a module (exported to ONNX first) or a float ``.onnx`` file.
        out_path: the int8 ``.onnx`` file to write.
        calibration: real inputs for static quantization: a tensor/array (N, ...) cut into batches of
            ``calibration_batch``, or an iterable of batches (tensors, or tuples for several inputs).
            None: dynamic quantization, said so in ``notes``.
        example_inputs: the inputs to export a module with (default: the first calibration sample).
        per_channel: one weight scale per output channel (else one per tensor).
        calibrate_method: ``"minmax"``, ``"entropy"`` or ``"percentile"`` (static only).
        activation_type: ``"uint8"`` or ``"int8"`` activations (static only).
        reduce_range: quantize weights to 7 bits (stored in int8). ``"auto"``: on an x86 CPU without VNNI
            (this process's ``/proc/cpuinfo``), where onnxruntime's u8s8 kernels add pairs of products in
            saturating int16 and full-range weights overflow (measured: the digits ResNet-20 factorized
            at 0.5 MACs fell from 97% to 61% accuracy); the model is for the machine it is made on.
        keep_float: op types (``"Gemm"``) or node names of the pre-processed graph to leave in float;
            entries that match nothing are named in ``notes``.
        calibration_batch: batch size a calibration tensor is cut into (a static-batch model's own size
            wins).
        preprocess: run ``quant_pre_process`` first (shape inference and optimization).
        force: overwrite an existing ``out_path``.
        exporter: the ONNX exporter for a module (see ``export_onnx``).
    Returns:
        A ``QuantizeResult``.
    Raises:
        InputSpecError: an unknown method or type, unusable calibration data, a module without inputs.
        OutputExistsError: ``out_path`` exists and ``force`` is False.
        ConvfactorError: onnxruntime's quantizer failed (its message in one line).
    """
    if calibrate_method not in CALIBRATE_METHODS:
        raise InputSpecError(f"unknown calibrate_method {calibrate_method!r}; choose {', '.join(CALIBRATE_METHODS)}")
    if activation_type not in ACTIVATION_TYPES:
        raise InputSpecError(f"unknown activation_type {activation_type!r}; choose {', '.join(ACTIVATION_TYPES)}")
    if isinstance(keep_float, str):
        keep_float = (keep_float,)
    if reduce_range not in (True, False, "auto"):
        raise InputSpecError(f"reduce_range must be True, False or 'auto', got {reduce_range!r}")
    reduced = needs_reduced_range() if reduce_range == "auto" else bool(reduce_range)
    out_path = check_writable(out_path, force)
    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(dir=out_path.parent, prefix=f".{out_path.name}.quantize-"))
    try:
        batches = None if calibration is None else _calibration_batches(calibration, calibration_batch)
        if isinstance(model_or_onnx_path, nn.Module) and example_inputs is None:
            if batches is None:
                raise InputSpecError("quantizing a module needs example_inputs or calibration data to export it")
            example_inputs = tuple(torch.from_numpy(a[:1]) for a in batches[0])
        prepared = prepare_onnx(model_or_onnx_path, example_inputs, staging, "float", exporter=exporter)
        float_size = _size(prepared.path)
        source, notes = _preprocessed(prepared.path, staging / "preprocessed.onnx", preprocess)
        graph = onnx.load(str(source), load_external_data=False)
        exclude, unmatched = _nodes_to_exclude(graph, keep_float)
        if unmatched:
            notes.append(f"keep_float entries matching no node: {', '.join(unmatched)}")
        staged = staging / out_path.name
        if reduced:
            notes.append("weights in 7 bits (reduce_range" + (": this x86 CPU has no VNNI, and onnxruntime's u8s8 "
                         "kernels would saturate on full-range weights)" if reduce_range == "auto" else ")"))
        if batches is None:
            notes.append("no calibration data: dynamic quantization (int8 weights, activation ranges computed at "
                         "run time); give calibration inputs for static QDQ quantization")
            _run_quantizer("dynamic", source, staged, per_channel=per_channel, reduce_range=reduced,
                           nodes_to_exclude=exclude)
            samples = 0
        else:
            batches = _fit_static_batch(graph, batches)
            samples = sum(int(b[0].shape[0]) for b in batches)
            _run_quantizer("static", source, staged, reader=_Reader(graph, batches), per_channel=per_channel,
                           reduce_range=reduced, nodes_to_exclude=exclude, calibrate_method=calibrate_method,
                           activation_type=activation_type)
        written = onnx.load(str(staged), load_external_data=False)
        onnx.checker.check_model(str(staged))
        publish(staged, out_path, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    static = batches is not None
    return QuantizeResult(
        path=out_path, mode="static" if static else "dynamic", format="QDQ" if static else "integer ops",
        per_channel=per_channel, reduce_range=reduced, weight_type="int8",
        activation_type=activation_type if static else "uint8",
        calibrate_method=calibrate_method if static else None, calibration_samples=samples,
        calibration_batches=len(batches) if static else 0, quantized_nodes=quantized_nodes(written),
        float_compute_nodes=float_compute_nodes(written), kept_float=tuple(exclude), bits=graph_bits(written),
        float_file_size=float_size, file_size=_size(out_path), seconds=time.perf_counter() - started,
        notes=tuple(notes))


# -- steps ------------------------------------------------------------------------------------------


def _preprocessed(source: Path, target: Path, enabled: bool) -> tuple[Path, list[str]]:
    """``quant_pre_process`` of ``source``; a failing step (symbolic shapes, optimization) is skipped and
    noted, so that a model onnxruntime's shape tools cannot read is still quantized."""
    if not enabled:
        return source, ["pre-processing skipped on request"]
    from onnxruntime.quantization.shape_inference import quant_pre_process

    notes: list[str] = []
    attempts = [("full", {}), ("without symbolic shape inference", {"skip_symbolic_shape": True}),
                ("without symbolic shape inference and optimization",
                 {"skip_symbolic_shape": True, "skip_optimization": True})]
    for label, skips in attempts:
        try:
            quant_pre_process(str(source), str(target), **skips)
            return target, notes
        except Exception as error:  # onnxruntime raises anything from its shape tools
            notes.append(f"quant_pre_process ({label}) failed: {one_line(error, with_type=True)[:200]}")
    notes.append("pre-processing failed in every form; quantized the exported graph as it is")
    return source, notes


def _nodes_to_exclude(graph: onnx.ModelProto, keep_float: Sequence[str]) -> tuple[list[str], list[str]]:
    """Names of the nodes that ``keep_float`` names by op type or node name, and the entries matching none."""
    wanted = set(keep_float)
    excluded = [node.name for node in graph.graph.node if node.op_type in wanted or node.name in wanted]
    matched = {node.op_type for node in graph.graph.node} | set(excluded)
    return excluded, [entry for entry in keep_float if entry not in matched]


class _WithoutPreprocessAdvice(logging.Filter):
    """Drops onnxruntime's "consider pre-processing" advice: whether the graph was pre-processed is decided
    (and, when skipped or failed, noted) by ``_preprocessed``; the advice repeated once per one-layer graph
    the int8 latency model times."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def _run_quantizer(mode: str, source: Path, target: Path, *, reader: Any = None, per_channel: bool,
                   reduce_range: bool, nodes_to_exclude: list[str], calibrate_method: str = "minmax",
                   activation_type: str = "uint8") -> None:
    """``quantize_static`` (QDQ) or ``quantize_dynamic``, with onnxruntime's failures as one line."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    source, target = Path(source).absolute(), Path(target).absolute()  # the calibrator runs in another directory

    advice = _WithoutPreprocessAdvice()
    logging.getLogger().addFilter(advice)
    try:
        if mode == "dynamic":
            quantize_dynamic(str(source), str(target), per_channel=per_channel, reduce_range=reduce_range,
                             weight_type=QuantType.QInt8, nodes_to_exclude=nodes_to_exclude or None)
            return
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[calibrate_method]
        activations = QuantType.QUInt8 if activation_type == "uint8" else QuantType.QInt8
        with tempfile.TemporaryDirectory(prefix="convfactor-calibrate-") as scratch, _in_directory(scratch):
            # the calibrator writes its augmented model into the working directory
            quantize_static(str(source), str(target), reader, quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, reduce_range=reduce_range, activation_type=activations,
                            weight_type=QuantType.QInt8,
                            nodes_to_exclude=nodes_to_exclude or None, calibrate_method=method,
                            extra_options={"QDQOpTypePerChannelSupportToAxis": NORM_SCALE_AXIS})
    except ConvfactorError:
        raise
    except Exception as error:
        raise ConvfactorError(f"onnxruntime's {mode} quantization failed: {one_line(error, with_type=True)}") from None
    finally:
        logging.getLogger().removeFilter(advice)


class _in_directory:
    """Run a block in another working directory (the calibrator's temporary files go there)."""

    def __init__(self, path: str):
        self.path, self.old = path, ""

    def __enter__(self) -> None:
        self.old = os.getcwd()
        os.chdir(self.path)

    def __exit__(self, *exc: Any) -> None:
        os.chdir(self.old)


# -- calibration data -------------------------------------------------------------------------------


def _calibration_batches(calibration: Any, batch: int) -> list[tuple[np.ndarray, ...]]:
    """Calibration data as batches of float arrays: a tensor is cut into ``batch``-sized pieces."""
    if batch < 1:
        raise InputSpecError(f"calibration_batch must be >= 1, got {batch}")
    if isinstance(calibration, (torch.Tensor, np.ndarray)):
        array = _array(calibration)
        if array.ndim == 0 or len(array) == 0:
            raise InputSpecError("calibration data is empty: give at least one sample (N, ...)")
        return [(array[i:i + batch],) for i in range(0, len(array), batch)]
    if isinstance(calibration, (str, bytes, dict)) or not isinstance(calibration, Iterable):
        raise InputSpecError(f"calibration must be a tensor or an iterable of batches, not "
                             f"{type(calibration).__name__}")
    batches = [tuple(_array(t) for t in as_input_tuple(tuple(b) if isinstance(b, list) else b))
               for b in calibration]
    if not batches:
        raise InputSpecError("calibration data is empty: give at least one batch")
    return batches


def _array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _fit_static_batch(graph: onnx.ModelProto, batches: list[tuple[np.ndarray, ...]]) -> list[tuple[np.ndarray, ...]]:
    """Batches re-cut to the model's own batch size when its batch axis is static (remainder dropped)."""
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    if not dims or not dims[0].HasField("dim_value") or dims[0].dim_value < 1:
        return batches
    size = dims[0].dim_value
    joined = [np.concatenate(parts) for parts in zip(*batches)]
    cut = [tuple(a[i:i + size] for a in joined) for i in range(0, len(joined[0]) - size + 1, size)]
    if not cut:
        raise InputSpecError(f"the model takes batches of {size}; give at least {size} calibration samples")
    return cut


class _Reader:
    """onnxruntime's ``CalibrationDataReader`` protocol over a list of batches."""

    def __init__(self, graph: onnx.ModelProto, batches: list[tuple[np.ndarray, ...]]):
        initializers = {t.name for t in graph.graph.initializer}
        self.names = [i.name for i in graph.graph.input if i.name not in initializers]
        if any(len(b) != len(self.names) for b in batches):
            raise InputSpecError(f"the model takes {len(self.names)} input(s) ({', '.join(self.names)}); a "
                                 f"calibration batch must hold exactly those")
        self.batches = batches
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.batches):
            return None
        batch = self.batches[self.position]
        self.position += 1
        return dict(zip(self.names, (np.ascontiguousarray(a) for a in batch)))

    def rewind(self) -> None:
        self.position = 0


def needs_reduced_range(cpuinfo: str | None = None) -> bool:
    """Whether int8 weights should use 7 bits here: an x86 CPU without VNNI (``avx512_vnni``, ``avx_vnni``,
    ``amx_int8``) runs onnxruntime's u8s8 products through saturating int16 sums. Other CPUs: False.
    ``cpuinfo``: a /proc/cpuinfo text to read instead of this machine's."""
    flags = cpu_flags(cpuinfo)
    x86 = "sse2" in flags
    return x86 and not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


def _size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)

