"""Per-layer time in onnxruntime, original vs factorized: which replacements pay.

onnxruntime's profiler (``SessionOptions.enable_profiling``) times every node of the *optimized*
graph. ``node_scopes`` traces those nodes back to the PyTorch module that produced them (through
onnxruntime's fusions and layout passes; layout reorders are charged to a neighbour and also totalled
separately). For the comparison, a factorized node is charged to the deepest of its scopes that is a
layer of the original model, so the stages ``layer1.0.conv1.vertical`` and ``.horizontal`` both count
for ``layer1.0.conv1``.

The dynamo exporter's metadata attributes every node. The TorchScript exporter writes GraphModule scopes
badly (``/seq.0_1/Conv``): convs and gemms are still found through their parameter-named weights, other
nodes of such an export may land in ``OUTSIDE_LAYERS`` (prefer ``exporter="dynamo"`` or ``"auto"``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from torch import nn

from ..errors import InputSpecError
from ..inputs import numpy_inputs
from ..tables import format_grid
from .node_scopes import REORDER_OPS, optimized_node_scopes
from .onnx_graph import op_key
from .sessions import (
    make_session,
    prepare_onnx,
    run_checked,
    session_feeds,
)

__all__ = [
    "NodeTiming",
    "ModelProfile",
    "LayerComparison",
    "LayerProfileReport",
    "OUTSIDE_LAYERS",
    "profile_model",
    "profile_layers",
]

OUTSIDE_LAYERS = "(outside any layer)"  # nodes of the top-level forward (torch.flatten, x.mean, ...)


@dataclass(frozen=True)
class NodeTiming:
    """One node of the optimized graph and its time per run.

    Attributes:
        node: name in onnxruntime's optimized graph.
        op_type: its op, ``domain::Op`` outside the standard domain (``com.microsoft.nchwc::Conv``).
        scopes: qualified names of the PyTorch modules it came from, outermost first (empty if none).
        reorder: a layout reorder onnxruntime inserted (its scopes are those of the node it serves).
        median_us: median over the profiled runs of the node's kernel time per run, microseconds.
        mean_us: the mean, for reference (outliers from preemption show here, not in the median).
    """

    node: str
    op_type: str
    scopes: tuple[str, ...]
    reorder: bool
    median_us: float
    mean_us: float

    @property
    def layer(self) -> str:
        """The innermost module, or ``OUTSIDE_LAYERS``."""
        return self.scopes[-1] if self.scopes else OUTSIDE_LAYERS

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "op_type": self.op_type, "layer": self.layer, "scopes": list(self.scopes),
                "reorder": self.reorder, "median_us": self.median_us, "mean_us": self.mean_us}


@dataclass(frozen=True)
class ModelProfile:
    """Node times of one model from onnxruntime's profiler.

    Attributes:
        path: the profiled ONNX file (None when it was a temporary export).
        runs: profiled runs (after warm-up).
        run_ms: median wall time of a run as onnxruntime measured it.
        nodes: every node that ran, slowest first.
    """

    path: str | None
    runs: int
    run_ms: float
    nodes: tuple[NodeTiming, ...]

    @property
    def node_total_ms(self) -> float:
        return sum(n.median_us for n in self.nodes) / 1e3

    def layer_times(self) -> dict[str, float]:
        """Milliseconds per innermost layer (reorders included), slowest first."""
        totals: dict[str, float] = defaultdict(float)
        for node in self.nodes:
            totals[node.layer] += node.median_us / 1e3
        return dict(sorted(totals.items(), key=lambda item: -item[1]))

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "runs": self.runs, "run_ms": self.run_ms, "node_total_ms": self.node_total_ms,
                "nodes": [n.to_dict() for n in self.nodes]}


@dataclass(frozen=True)
class LayerComparison:
    """One layer of the original model: its time there and the time of what replaced it.

    Attributes:
        layer: qualified module name in the original model (or ``OUTSIDE_LAYERS``).
        original_ms, factorized_ms: median time per run of the nodes attributed to the layer, layout
            reorders included (0.0 when no node ran for it, e.g. a Relu fused into a conv).
        original_reorder_ms, factorized_reorder_ms: the part of those spent in layout reorders.
        replaced: the factorized model runs this layer as submodules (its stages).
        original_nodes, factorized_nodes: the node names behind each time.
    """

    layer: str
    original_ms: float
    factorized_ms: float
    original_reorder_ms: float
    factorized_reorder_ms: float
    replaced: bool
    original_nodes: tuple[str, ...]
    factorized_nodes: tuple[str, ...]

    @property
    def speedup(self) -> float:
        """``original_ms / factorized_ms``: below 1 the replacement is slower than what it replaced."""
        if self.factorized_ms == 0.0:
            return math.inf if self.original_ms > 0 else 1.0
        return self.original_ms / self.factorized_ms

    @property
    def pays(self) -> bool:
        return self.factorized_ms < self.original_ms

    def to_dict(self) -> dict[str, Any]:
        speedup = self.speedup
        return {"layer": self.layer, "original_ms": self.original_ms, "factorized_ms": self.factorized_ms,
                "original_reorder_ms": self.original_reorder_ms, "factorized_reorder_ms": self.factorized_reorder_ms,
                "speedup": speedup if math.isfinite(speedup) else "inf", "pays": self.pays, "replaced": self.replaced,
                "original_nodes": list(self.original_nodes), "factorized_nodes": list(self.factorized_nodes)}


@dataclass(frozen=True)
class LayerProfileReport:
    """Per-layer comparison of the original and the factorized model."""

    layers: tuple[LayerComparison, ...]
    original: ModelProfile
    factorized: ModelProfile
    threads: int
    graph_optimization: str
    input_shapes: tuple[tuple[int, ...], ...]

    def replaced_layers(self) -> list[LayerComparison]:
        return [row for row in self.layers if row.replaced]

    def slower_replacements(self) -> list[LayerComparison]:
        """Replaced layers whose replacement takes longer than the original layer."""
        return [row for row in self.layers if row.replaced and not row.pays]

    def to_dict(self) -> dict[str, Any]:
        return {"threads": self.threads, "graph_optimization": self.graph_optimization,
                "input_shapes": [list(s) for s in self.input_shapes],
                "layers": [row.to_dict() for row in self.layers],
                "original": self.original.to_dict(), "factorized": self.factorized.to_dict()}

    def render(self, limit: int | None = None) -> str:
        """A table of layers, slowest original layer first; slower replacements are marked.

        Args:
            limit: show at most this many layers (None: all).
        """
        lines = [
            f"per-layer time, onnxruntime CPU, {self.threads} thread(s), graph optimization {self.graph_optimization}, "
            f"inputs {', '.join(str(list(s)) for s in self.input_shapes)}",
        ]
        rows = []
        for row in self.layers if limit is None else self.layers[:limit]:
            mark = "replaced" if row.replaced else ""
            if row.replaced and not row.pays:
                mark = "replaced, SLOWER"
            speedup = f"{row.speedup:.2f}x" if math.isfinite(row.speedup) else "-"
            rows.append([row.layer, f"{row.original_ms:.4f}", f"{row.factorized_ms:.4f}",
                         f"{row.factorized_reorder_ms:.4f}", speedup, mark])
        more = [[f"... {len(self.layers) - limit} more layers", "", "", "", "", ""]] \
            if limit is not None and len(self.layers) > limit else []
        totals = [["sum of nodes", f"{self.original.node_total_ms:.4f}", f"{self.factorized.node_total_ms:.4f}",
                   "", "", ""],
                  ["median run", f"{self.original.run_ms:.4f}", f"{self.factorized.run_ms:.4f}", "", "", ""]]
        lines += format_grid(["layer", "original ms", "factorized ms", "(reorder)", "speedup", ""],
                             rows + more + totals, left=1, free_last=True)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


# -- public entry points ----------------------------------------------------------------------------


def profile_model(
    model: nn.Module | str | os.PathLike,
    example_inputs: Any = None,
    *,
    input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
    threads: int = 1,
    graph_optimization: str = "all",
    warmup: int = 3,
    iterations: int = 20,
    seed: int = 0,
    exporter: str = "auto",
    workdir: str | os.PathLike | None = None,
) -> ModelProfile:
    """Run one model under onnxruntime's profiler and attribute node times to module names.

    Args:
        model: a module (exported to ONNX here) or a path to an ``.onnx`` file.
        example_inputs: a tensor or tuple of tensors; or None with ``input_shape`` (standard normal).
        input_shape: shape of each input, batch axis first.
        threads: onnxruntime intra-op threads.
        graph_optimization: onnxruntime optimization level (see ``make_session``).
        warmup: runs before the profiled ones (their events are dropped).
        iterations: profiled runs; a node's time is its median over them.
        seed: seed of generated inputs.
        exporter: ``"auto"``, ``"dynamo"`` or ``"torchscript"``.
        workdir: where the export, the trace and the optimized graph go (default: temporary).
    Returns:
        A ``ModelProfile``.
    """
    inputs = numpy_inputs(example_inputs, input_shape, seed)
    _check_counts(warmup, iterations)
    with tempfile.TemporaryDirectory(prefix="convfactor-profile-") as scratch:
        directory = Path(scratch if workdir is None else workdir)
        return _profile(model, inputs, directory, "model", threads, graph_optimization, warmup, iterations,
                        exporter, kept=workdir is not None)


def profile_layers(
    original: nn.Module | str | os.PathLike,
    factorized: nn.Module | str | os.PathLike,
    example_inputs: Any = None,
    *,
    input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
    threads: int = 1,
    graph_optimization: str = "all",
    warmup: int = 3,
    iterations: int = 20,
    seed: int = 0,
    exporter: str = "auto",
    replaced: Iterable[str] | None = None,
    workdir: str | os.PathLike | None = None,
) -> LayerProfileReport:
    """Profile both models and compare, per original layer, its time with that of its replacement.

    Args:
        original, factorized: modules or ONNX paths (modules give the most reliable layer names).
        example_inputs, input_shape, threads, graph_optimization, warmup, iterations, seed, exporter,
            workdir: as for ``profile_model``.
        replaced: qualified names of the layers that were factorized (e.g. from the factorize report);
            None: a layer counts as replaced when the factorized model runs it through submodules.
    Returns:
        A ``LayerProfileReport``; layers sorted by original time, slowest first.
    """
    inputs = numpy_inputs(example_inputs, input_shape, seed)
    _check_counts(warmup, iterations)
    with tempfile.TemporaryDirectory(prefix="convfactor-profile-") as scratch:
        directory = Path(scratch if workdir is None else workdir)
        kept = workdir is not None
        profile_a = _profile(original, inputs, directory, "original", threads, graph_optimization, warmup,
                             iterations, exporter, kept)
        profile_b = _profile(factorized, inputs, directory, "factorized", threads, graph_optimization, warmup,
                             iterations, exporter, kept)
    rows = _compare(profile_a, profile_b, None if replaced is None else set(replaced))
    return LayerProfileReport(tuple(rows), profile_a, profile_b, threads, graph_optimization,
                              tuple(tuple(a.shape) for a in inputs))


# -- profiling one model ----------------------------------------------------------------------------


def _check_counts(warmup: int, iterations: int) -> None:
    if warmup < 0 or iterations < 1:
        raise InputSpecError(f"need warmup >= 0 and iterations >= 1, got {warmup} and {iterations}")


def _profile(model: Any, inputs: tuple[np.ndarray, ...], directory: Path, name: str, threads: int,
             graph_optimization: str, warmup: int, iterations: int, exporter: str, kept: bool) -> ModelProfile:
    prepared = prepare_onnx(model, inputs, directory, name, exporter=exporter)
    module_names = None if prepared.module is None else {n for n, _ in prepared.module.named_modules() if n}
    optimized_path = directory / f"{name}.optimized.onnx"
    session = make_session(prepared.path, threads=threads, graph_optimization=graph_optimization,
                           enable_profiling=True, profile_prefix=directory / f"{name}.profile",
                           optimized_model_path=optimized_path)
    feeds = session_feeds(session, inputs)
    run_checked(session, feeds, prepared.path.name)  # fails clearly on unfit inputs; a warm-up run
    for _ in range(warmup + iterations):
        session.run(None, feeds)
    trace_path = session.end_profiling()
    with open(trace_path, encoding="utf-8") as handle:
        events = json.load(handle)
    per_run, run_us = _node_times(events, iterations)

    source = onnx.load(str(prepared.path), load_external_data=False)
    optimized = onnx.load(str(optimized_path), load_external_data=False)
    scopes = optimized_node_scopes(source, optimized, module_names)
    optimized_ops = {n.name: op_key(n) for n in optimized.graph.node}
    nodes = []
    for node_name, times in per_run.items():
        op_type = optimized_ops.get(node_name, "?")
        nodes.append(NodeTiming(node_name, op_type, scopes.get(node_name, ()),
                                op_type.split("::")[-1] in REORDER_OPS, float(np.median(times)),
                                float(np.mean(times))))
    nodes.sort(key=lambda n: -n.median_us)
    path = str(prepared.path) if kept or prepared.module is None else None
    return ModelProfile(path, len(run_us), float(np.median(run_us)) / 1e3 if run_us else 0.0, tuple(nodes))


def _node_times(events: list[dict[str, Any]], iterations: int) -> tuple[dict[str, np.ndarray], list[float]]:
    """Kernel microseconds per node in each of the last ``iterations`` runs, and those runs' durations.

    Returns:
        ``{node name: array of its time in each run}`` (0 where it did not run) and run durations (us).
    """
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])[-iterations:]
    if not runs:
        return {}, []
    starts = np.array([r["ts"] for r in runs], dtype=np.float64)
    ends = starts + np.array([r["dur"] for r in runs], dtype=np.float64)
    per_run: dict[str, np.ndarray] = {}
    suffix = "_kernel_time"
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith(suffix):
            continue
        run = int(np.searchsorted(starts, event["ts"], side="right")) - 1
        if run < 0 or event["ts"] > ends[run]:
            continue  # warm-up run or session setup
        times = per_run.setdefault(name[: -len(suffix)], np.zeros(len(runs)))
        times[run] += float(event.get("dur", 0))
    return per_run, [float(r["dur"]) for r in runs]


# -- attribution ------------------------------------------------------------------------------------


# -- comparison -------------------------------------------------------------------------------------


def _compare(original: ModelProfile, factorized: ModelProfile, replaced: set[str] | None) -> list[LayerComparison]:
    original_layers = {node.layer for node in original.nodes}
    per_layer: dict[str, dict[str, Any]] = defaultdict(lambda: {
        "original_ms": 0.0, "factorized_ms": 0.0, "original_reorder_ms": 0.0, "factorized_reorder_ms": 0.0,
        "original_nodes": [], "factorized_nodes": [], "deeper": False,
    })
    for node in original.nodes:
        row = per_layer[node.layer]
        row["original_ms"] += node.median_us / 1e3
        row["original_reorder_ms"] += node.median_us / 1e3 if node.reorder else 0.0
        row["original_nodes"].append(node.node)
    for node in factorized.nodes:
        # Charge the node to the deepest scope the original also has: a stage's time is its layer's.
        layer = next((s for s in reversed(node.scopes) if s in original_layers), node.layer)
        row = per_layer[layer]
        row["factorized_ms"] += node.median_us / 1e3
        row["factorized_reorder_ms"] += node.median_us / 1e3 if node.reorder else 0.0
        row["factorized_nodes"].append(node.node)
        row["deeper"] |= layer != node.layer and not node.reorder
    rows = []
    for layer, row in per_layer.items():
        deeper = row.pop("deeper")
        is_replaced = deeper if replaced is None else layer in replaced
        rows.append(LayerComparison(layer=layer, replaced=is_replaced,
                                    original_nodes=tuple(row.pop("original_nodes")),
                                    factorized_nodes=tuple(row.pop("factorized_nodes")), **row))
    rows.sort(key=lambda r: (-r.original_ms, -r.factorized_ms, r.layer))
    return rows
