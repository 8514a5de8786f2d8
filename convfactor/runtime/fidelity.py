"""How closely a factorized model reproduces the original, measured in onnxruntime.

Both models run as ONNX in onnxruntime on the same inputs: the user's batches, or standard-normal
ones when none are given (the report says which). Per output, with ``a`` the original's output and
``b`` the factorized one's over all samples::

    max_abs_error = max |a - b|            rel_l2_error = ||a - b|| / ||a||
    worst_slice_rel_error = max over slices s along the feature axis of ||a_s - b_s|| / ||a_s||
    snr_db = 10 log10(||a||^2 / ||a - b||^2) = -20 log10(rel_l2_error)
    cosine = mean over samples of <a_i, b_i> / (||a_i|| ||b_i||)

The relative-error tolerance applies to the worst slice (``convfactor.output_error``: declared slices, or
runs of channels of similar scale), so a small head inside one tensor is judged on its own scale. Top-1
agreement (same argmax along the feature axis) and top-5 overlap (C > 5) are computed only for outputs
declared as class scores (``outputs={0: {"kind": "scores"}}``, the policy's ``fidelity: outputs:``
format): a regression head or a recurrent state has no class. Each criterion has its own tolerance.

Separately, every model given as a module is compared with its own ONNX export (float32, relative L2
error <= ``export_tolerance``), so an exporter problem is never mistaken for a factorization error.
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import InputSpecError, PolicyError
from ..fidelity_spec import Fidelity, parse_fidelity
from ..inputs import as_input_tuple, input_shapes, standard_normal_inputs
from ..output_error import ErrorAccumulator, OutputLayout, plan_layouts
from .fidelity_report import ExportCheck, FidelityReport, OutputFidelity, criteria
from .sessions import (
    PreparedModel,
    make_session,
    prepare_onnx,
    run_checked,
    session_feeds,
)

__all__ = [
    "check_fidelity",
    "output_metrics",
]


def output_metrics(reference: np.ndarray, candidate: np.ndarray, layout: OutputLayout | None = None
                   ) -> dict[str, float]:
    """Error measures of ``candidate`` against ``reference`` (same shape, axis 0 = samples).

    Args:
        reference: the original model's output, all samples.
        candidate: the factorized model's output, same shape.
        layout: its slices and kind (``convfactor.output_error.plan_layouts``); None: found from the data,
            kind ``auto`` (no agreement).
    Returns:
        ``max_abs_error``, ``rel_l2_error``, ``worst_slice_rel_error``, ``snr_db``, ``cosine`` (mean over
        samples), ``cosine_min``, and for outputs declared as class scores ``top1_agreement`` (plus
        ``top5_overlap`` when C > 5, for [N, C] outputs).
    """
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(candidate, dtype=np.float64)
    if a.shape != b.shape:
        raise InputSpecError(f"outputs differ in shape: {list(a.shape)} vs {list(b.shape)}")
    diff = a - b
    ref_norm, err_norm = float(np.linalg.norm(a)), float(np.linalg.norm(diff))
    metrics = {
        "max_abs_error": float(np.max(np.abs(diff))) if diff.size else 0.0,
        "rel_l2_error": _ratio(err_norm, ref_norm),
        "snr_db": _snr_db(ref_norm, err_norm),
    }
    per_sample_a = a.reshape(a.shape[0], -1) if a.ndim else a.reshape(1, -1)
    per_sample_b = b.reshape(per_sample_a.shape)
    cosines = _cosines(per_sample_a, per_sample_b)
    metrics["cosine"] = float(cosines.mean())
    metrics["cosine_min"] = float(cosines.min())
    if layout is None:
        layout = plan_layouts(["output"], [a], None)[0]
    accumulator = ErrorAccumulator([layout])
    accumulator.add([a], [b])
    measured = accumulator.result("worst")
    metrics["worst_slice_rel_error"] = measured["worst_rel_error"]
    if measured["agreement"] is not None:
        metrics["top1_agreement"] = measured["agreement"]
        if a.ndim == 2 and a.shape[1] > 5:
            metrics["top5_overlap"] = _topk_overlap(a, b, 5)
    return metrics


def check_fidelity(
    original: nn.Module | str | os.PathLike,
    factorized: nn.Module | str | os.PathLike,
    inputs: Any = None,
    *,
    input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
    n_samples: int = 32,
    max_batches: int | None = None,
    seed: int = 0,
    max_abs_error: float | None = None,
    max_rel_l2_error: float | None = 0.1,
    min_cosine: float | None = 0.99,
    min_snr_db: float | None = 20.0,
    min_top1_agreement: float | None = 0.9,
    min_top5_overlap: float | None = 0.9,
    export_tolerance: float = 1e-5,
    outputs: Any = None,
    reduce: str = "worst",
    exporter: str = "auto",
    threads: int | None = None,
    workdir: str | os.PathLike | None = None,
) -> FidelityReport:
    """Compare the original and the factorized model in onnxruntime; check both exports too.

    Args:
        original, factorized: modules (exported to ONNX here) or paths to ``.onnx`` files.
        inputs: a tensor (one batch), a tuple of tensors (one batch of a multi-input model), or any
            other iterable of such batches (a list, a DataLoader yielding only the inputs).
            None: ``n_samples`` standard-normal samples, in batches of ``input_shape``.
        input_shape: shape of one generated batch, batch axis first, e.g. ``(8, 3, 32, 32)`` (a list
            of shapes for several inputs). When None and ``original`` is an ONNX file with static
            dimensions besides the batch, its input shapes are used with batch 8.
        n_samples: generated samples (rounded up to whole batches); ignored for user inputs.
        max_batches: use at most this many user batches (None: all).
        seed: seed of the generated inputs.
        max_abs_error: largest allowed max |a - b|; None: not checked (it depends on the output scale).
        max_rel_l2_error: largest allowed relative L2 error of each output's worst slice (``reduce="worst"``)
            or of each whole output (``reduce="pooled"``); None: not checked.
        min_cosine: smallest allowed mean per-sample cosine similarity; None: not checked.
        min_snr_db: smallest allowed signal-to-noise ratio in dB; None: not checked.
        min_top1_agreement: smallest allowed fraction with the same argmax, on outputs declared as class
            scores in ``outputs``; None: not checked.
        min_top5_overlap: smallest allowed mean shared fraction of the top-5 classes (C > 5); None: not checked.
        export_tolerance: largest allowed relative L2 error between a module and its ONNX export.
        outputs: how outputs are measured, in the policy's ``fidelity: outputs:`` form (``{0: {"kind":
            "scores"}, "boxes": {"slices": {"xy": [0, 2]}}}``) or a ``Fidelity``; keys are output indices or
            ONNX output names.
        reduce: ``"worst"`` (the tolerance holds for every slice) or ``"pooled"`` (for each whole output).
        exporter: ``"auto"``, ``"dynamo"`` or ``"torchscript"`` (see ``export_onnx``).
        threads: onnxruntime intra-op threads (None: all cores).
        workdir: where exported files go (default: a temporary directory, removed afterwards).
    Returns:
        A ``FidelityReport``; ``report.passed`` is the overall verdict.
    Raises:
        InputSpecError: no usable inputs, or the models' inputs/outputs do not match.
        ExportError: a module could not be exported.
    """
    spec = outputs if isinstance(outputs, Fidelity) or outputs is None else _output_spec(outputs, reduce)
    relative = "worst_slice_rel_error" if (spec.reduce if spec is not None else reduce) == "worst" else "rel_l2_error"
    thresholds = {
        "max_abs_error": max_abs_error, relative: max_rel_l2_error, "cosine": min_cosine,
        "snr_db": min_snr_db, "top1_agreement": min_top1_agreement, "top5_overlap": min_top5_overlap,
    }
    for name, value in [*thresholds.items(), ("export_tolerance", export_tolerance)]:
        optional = name != "export_tolerance"
        is_number = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
        if not (is_number or (optional and value is None)):
            raise InputSpecError(f"tolerance {name} must be a number{' or None' if optional else ''}, got {value!r}")

    with tempfile.TemporaryDirectory(prefix="convfactor-fidelity-") as scratch:
        directory = scratch if workdir is None else workdir
        batches, generated, description = _input_batches(original, inputs, input_shape, n_samples,
                                                         max_batches, seed)
        example = batches[0]
        models = {
            "original": prepare_onnx(original, example, directory, "original", exporter=exporter),
            "factorized": prepare_onnx(factorized, example, directory, "factorized", exporter=exporter),
        }
        onnx_outputs = {role: _run_onnx(model, batches, threads) for role, model in models.items()}
        export_checks = []
        for role, model in models.items():
            if model.module is not None:
                torch_outputs = _run_torch(model.module, batches)
                export_checks += _export_checks(role, onnx_outputs[role], torch_outputs, export_tolerance)

    names_a, outputs_a = onnx_outputs["original"]
    names_b, outputs_b = onnx_outputs["factorized"]
    if len(outputs_a) != len(outputs_b):
        raise InputSpecError(f"the original has {len(outputs_a)} output(s), the factorized model {len(outputs_b)}")
    results = []
    try:
        layouts = plan_layouts(names_a, outputs_a, spec)
    except ValueError as bad:
        raise InputSpecError(str(bad)) from None
    for name, a, b, layout in zip(names_a, outputs_a, outputs_b, layouts):
        if a.shape != b.shape:
            raise InputSpecError(f"output {name!r} has shape {list(a.shape)} in the original "
                                 f"but {list(b.shape)} in the factorized model")
        if layout.kind == "ignore":
            continue
        metrics = output_metrics(a, b, layout)
        results.append(OutputFidelity(name, tuple(a.shape), metrics, criteria(metrics, thresholds)))
    return FidelityReport(
        inputs_generated=generated,
        input_description=description,
        n_samples=int(sum(_batch_size(batch) for batch in batches)),
        n_batches=len(batches),
        outputs=tuple(results),
        export_checks=tuple(export_checks),
        models={role: model.to_dict(kept=workdir is not None) for role, model in models.items()},
    )


def _output_spec(outputs: Any, reduce: str) -> Fidelity:
    """``outputs`` in the policy's form as a ``Fidelity`` without criteria (errors as InputSpecError)."""
    try:
        return parse_fidelity({"outputs": outputs, "reduce": reduce})
    except PolicyError as bad:
        raise InputSpecError(str(bad).replace("policy: fidelity ", "check_fidelity: ")) from None


# -- inputs -----------------------------------------------------------------------------------------


def _input_batches(
    original: Any, inputs: Any, input_shape: Any, n_samples: int, max_batches: int | None, seed: int
) -> tuple[list[tuple[np.ndarray, ...]], bool, str]:
    """The batches to run, whether they were generated, and a description for the report."""
    if inputs is not None:
        batches = [_as_arrays(batch) for batch in _iter_batches(inputs, max_batches)]
        if not batches:
            raise InputSpecError("inputs is empty: give at least one batch")
        shapes = sorted({tuple(tuple(a.shape[1:]) for a in batch) for batch in batches})
        shown = "; ".join(", ".join(str(["N", *s]) for s in shape) for shape in shapes[:3])
        return batches, False, f"user batches, shapes {shown}"
    if n_samples < 1:
        raise InputSpecError(f"n_samples must be >= 1, got {n_samples}")
    if input_shape is None:
        input_shape = _onnx_input_shapes(original)
    shapes = input_shapes(input_shape)
    batch = shapes[0][0]
    count = max(1, math.ceil(n_samples / batch))
    batches = [standard_normal_inputs(shapes, seed=seed + i) for i in range(count)]
    shown = ", ".join(str(list(s)) for s in shapes)
    return batches, True, f"generated standard-normal float32, batch shape {shown}, seed {seed}"


def _iter_batches(inputs: Any, max_batches: int | None) -> Iterable[Any]:
    if isinstance(inputs, (torch.Tensor, np.ndarray, tuple)):
        yield inputs  # one batch (a tuple is one batch of a multi-input model)
        return
    if isinstance(inputs, (str, bytes, dict)) or not isinstance(inputs, Iterable):
        raise InputSpecError(f"inputs must be a tensor, a tuple of tensors or an iterable of batches, "
                             f"not {type(inputs).__name__}")
    for i, batch in enumerate(inputs):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


def _as_arrays(batch: Any) -> tuple[np.ndarray, ...]:
    if isinstance(batch, list):
        batch = tuple(batch)
    tensors = as_input_tuple(batch)
    arrays = tuple(t.detach().cpu().numpy() for t in tensors)
    if any(a.ndim == 0 for a in arrays):
        raise InputSpecError("each input needs a batch axis (got a 0-d tensor)")
    return arrays


def _batch_size(batch: tuple[np.ndarray, ...]) -> int:
    return int(batch[0].shape[0])


def _onnx_input_shapes(model: Any) -> list[tuple[int, ...]]:
    """Input shapes of an ONNX file with batch 8, when every other dimension is static."""
    hint = "give inputs or input_shape, e.g. input_shape=(8, 3, 224, 224)"
    if not isinstance(model, (str, os.PathLike)):
        raise InputSpecError(f"no inputs to compare on: {hint}")
    graph = onnx.load(str(model), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    shapes = []
    for value in graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        static = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        if not static or any(d is None for d in static[1:]):
            raise InputSpecError(f"input {value.name!r} of {model} has non-static dimensions: {hint}")
        shapes.append((8 if static[0] is None else static[0], *static[1:]))
    return shapes


# -- running ----------------------------------------------------------------------------------------


def _run_onnx(model: PreparedModel, batches: list[tuple[np.ndarray, ...]],
              threads: int | None) -> tuple[list[str], list[np.ndarray]]:
    session = make_session(model.path, threads=threads)
    names = [o.name for o in session.get_outputs()]
    per_batch = []
    for batch in batches:
        per_batch.append(run_checked(session, session_feeds(session, batch), model.path.name))
    return names, _concatenate(per_batch)


@torch.no_grad()
def _run_torch(module: nn.Module, batches: list[tuple[np.ndarray, ...]]) -> list[np.ndarray]:
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        per_batch = []
        for batch in batches:
            outputs = module(*(torch.from_numpy(a).to(device) for a in batch))
            per_batch.append([t.detach().cpu().numpy() for t in torch.utils._pytree.tree_leaves(outputs)])
    finally:
        for m, training in flags:
            m.training = training
    return _concatenate(per_batch)


def _concatenate(per_batch: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Join each output over batches along axis 0 (0-d outputs are stacked)."""
    joined = []
    for parts in zip(*per_batch):
        joined.append(np.stack(parts) if parts[0].ndim == 0 else np.concatenate(parts, axis=0))
    return joined


def _export_checks(role: str, onnx_outputs: tuple[list[str], list[np.ndarray]], torch_outputs: list[np.ndarray],
                   tolerance: float) -> list[ExportCheck]:
    names, arrays = onnx_outputs
    if len(arrays) != len(torch_outputs):
        raise InputSpecError(f"the {role} export has {len(arrays)} output(s), the module {len(torch_outputs)}")
    checks = []
    for name, exported, reference in zip(names, arrays, torch_outputs):
        a = reference.astype(np.float64)
        b = exported.astype(np.float64)
        rel = _ratio(float(np.linalg.norm(a - b)), float(np.linalg.norm(a))) if a.shape == b.shape else math.inf
        max_abs = float(np.max(np.abs(a - b))) if a.shape == b.shape and a.size else math.inf
        checks.append(ExportCheck(role, name, rel, max_abs, tolerance))
    return checks


# -- criteria ---------------------------------------------------------------------------------------


def _ratio(numerator: float, denominator: float) -> float:
    if denominator == 0.0:
        return 0.0 if numerator == 0.0 else math.inf
    return numerator / denominator


def _snr_db(signal_norm: float, error_norm: float) -> float:
    if error_norm == 0.0:
        return math.inf
    if signal_norm == 0.0:
        return -math.inf
    return 20.0 * math.log10(signal_norm / error_norm)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity; 1 where both rows are zero, 0 where only one is."""
    dot = np.einsum("ij,ij->i", a, b)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
    return np.where(both_zero, 1.0, np.clip(cos, -1.0, 1.0))


def _topk_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    top_a = np.argsort(-a, axis=1, kind="stable")[:, :k]
    top_b = np.argsort(-b, axis=1, kind="stable")[:, :k]
    shared = [len(set(row_a) & set(row_b)) for row_a, row_b in zip(top_a, top_b)]
    return float(np.mean(shared) / k)


