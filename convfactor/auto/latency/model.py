"""Latency model: measured time of each candidate replacement in a target runtime, with a disk cache.

Two targets (``latency={"runtime": ..., "device": ...}``, ``convfactor.auto.latency.options``):

- ``runtime="onnxruntime"`` (default), CPU: one-layer ONNX graphs (``convfactor.auto.latency.ort_timing``);
- ``runtime="torch"``, ``device="cpu"`` or ``"cuda"``: PyTorch eager modules (``convfactor.auto.latency.torch_timing``).

In both, all variants of one layer are timed in the same process, interleaved round-robin, and an empty
(Identity) variant on the same input measures the per-call overhead, which is subtracted; each time is
the fastest decile of its runs, robust to other jobs (``convfactor.auto.latency.round_robin``). Variants are
stored as ratios to their original timed with them, cached on disk per machine, runtime, threads,
geometry, method and rank (``convfactor.auto.latency.cache``).

Whole models (the final check that the factorized network is faster) are timed in the same runtime:
interleaved pairs, median of the per-pair ratios.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...costs import meta_twin
from ...geometry import LayerGeometry
from ...methods import get_method
from ...methods.base import Rank
from .cache import CACHE_FORMAT, LatencyCache, default_cache_path, machine_key
from .options import DEVICES, RUNTIMES, LatencyOptions
from .ort_timing import (
    compare_models_onnxruntime,
    layer_onnx,
    time_layers_onnxruntime,
    time_model_onnxruntime,
    time_originals_onnxruntime,
)
from .torch_timing import compare_models_torch, time_layers_torch, time_model_torch

__all__ = [
    "LatencyOptions",
    "LatencyCache",
    "LatencyModel",
    "layer_onnx",
    "time_layers",
    "time_model",
    "compare_models",
    "default_cache_path",
    "machine_key",
    "CACHE_FORMAT",
    "RUNTIMES",
    "DEVICES",
]

_ORIGINAL = "original"
# Part of every cache key: how an entry was measured. An entry is a ratio to its original layer timed in the
# same rounds, and an original below the timer's resolution is stored as unresolved. Entries measured any
# other way carry another number and are never reused (times taken under different load do not compare).
TIMING_FORM = 3

# Bytes of the timing sessions alive at once for one layer (each holds buffers of its input and output
# size several times over: ~120 MB per session for CRAFT's 64-channel 256x256 conv, 7.5x its input and
# output together), so that timing a wide layer's variants stays within issue-level memory bounds.
TIMING_BYTES = 1 << 30
_SESSION_FACTOR = 8


def _session_bytes(layer: nn.Module, input_shape: Sequence[int]) -> int:
    """An upper estimate of one timing session's buffers for ``layer`` on ``input_shape`` (float32)."""
    inputs = math.prod(int(size) for size in input_shape)
    c_in = int(input_shape[1]) if len(input_shape) > 1 else 1
    c_out = getattr(layer, "out_channels", getattr(layer, "out_features", c_in))
    stride = math.prod(int(step) for step in getattr(layer, "stride", (1,)))
    outputs = inputs * c_out // max(c_in * stride, 1)
    return max(1, _SESSION_FACTOR * 4 * (inputs + max(outputs, 1)))


# (modules, input shape, options) -> milliseconds per module (fastest decile), overhead already subtracted.
LayerTimer = Callable[[Sequence[nn.Module], Sequence[int], LatencyOptions], list[float]]
# (original, candidate, example inputs, options) -> speedup of the candidate (> 1: faster).
ModelComparer = Callable[[nn.Module, nn.Module, tuple[torch.Tensor, ...], LatencyOptions], float]
# (model, example inputs, options) -> milliseconds of one run (fastest decile).
ModelTimer = Callable[[nn.Module, tuple[torch.Tensor, ...], LatencyOptions], float]


def time_layers(modules: Sequence[nn.Module], input_shape: Sequence[int], options: LatencyOptions) -> list[float]:
    """Time (ms) of each module on ``input_shape`` in ``options.runtime``, interleaved, minus call overhead.

    Args:
        modules: what to time (an Identity, a Conv1d/Conv2d/Linear or a Sequential of them); only their
            structure matters, weights are replaced by random ones.
        input_shape: the input's shape, batch first.
        options: runtime, device, threads, warmup, repeats and the time limit.
    Returns:
        One time per module, in ms (``round_robin.Timings``), floored at ``RESOLUTION`` of the call
        overhead (at least 1e-4) so that no replacement looks free and noise reads as the floor.
    """
    if options.runtime == "torch":
        return time_layers_torch(modules, input_shape, options)
    return time_layers_onnxruntime(modules, input_shape, options)


def compare_models(original: nn.Module, candidate: nn.Module, inputs: tuple[torch.Tensor, ...],
                   options: LatencyOptions) -> float:
    """Speedup of ``candidate`` over ``original`` in ``options.runtime`` (median of interleaved pair ratios).

    Args:
        original: the model as given.
        candidate: the factorized model.
        inputs: example inputs of both.
        options: runtime, device, threads and verify_min_time (seconds of pairs, at least 30 pairs).
    Returns:
        The median over pairs of time(original) / time(candidate): > 1 means the candidate is faster.
    """
    if options.runtime == "torch":
        return compare_models_torch(original, candidate, inputs, options)
    return compare_models_onnxruntime(original, candidate, inputs, options)


def time_model(module: nn.Module, inputs: tuple[torch.Tensor, ...], options: LatencyOptions) -> float:
    """Time (ms) of one run of a whole model on ``inputs`` in ``options.runtime`` (its fastest decile of runs).

    Args:
        module: the model.
        inputs: its example inputs.
        options: runtime, device, threads and verify_min_time (half of it is spent timing, at least 30 runs).
    Returns:
        The time of one run, in ms.
    """
    if options.runtime == "torch":
        return time_model_torch(module, inputs, options)
    return time_model_onnxruntime(module, inputs, options)


def _geometry_key(layer: nn.Module, input_shape: Sequence[int]) -> dict[str, Any]:
    geo = LayerGeometry.of(layer)
    return {"kind": geo.kind, "in": geo.in_channels, "out": geo.out_channels, "kernel": list(geo.kernel),
            "stride": list(geo.stride), "padding": geo.padding if isinstance(geo.padding, str) else list(geo.padding),
            "dilation": list(geo.dilation), "groups": geo.groups, "bias": geo.bias, "padding_mode": geo.padding_mode,
            "input": list(input_shape)}


class LatencyModel:
    """Per-layer measured times of candidate replacements, cached on disk.

    Args:
        options: ``LatencyOptions`` or its mapping form.
        timer: how a layer's variants are timed (default ``time_layers``); tests pass a stub.
        comparer: how whole models are compared (default ``compare_models``); tests pass a stub.
        model_timer: how one whole model is timed (default ``time_model``); tests pass a stub.
    """

    def __init__(self, options: LatencyOptions | Mapping[str, Any] | None = None, *,
                 timer: LayerTimer | None = None, comparer: ModelComparer | None = None,
                 model_timer: ModelTimer | None = None):
        self.options = LatencyOptions.from_any(options)
        cache = self.options.cache
        path = None if cache is False else (default_cache_path() if cache in (None, True) else Path(cache))
        self.cache = LatencyCache(path)
        self.timer = timer or time_layers
        self.comparer = comparer or compare_models
        self.model_timer = model_timer or time_model
        self.measured = 0  # variants actually timed (not found in the cache)
        self.reference: dict[str, float] = {}  # geometry key -> original layer time timed with all others
        self._machine: dict[str, Any] | None = None

    def key(self, layer: nn.Module, input_shape: Sequence[int], method: str, rank: Rank | None) -> str:
        """The cache key of one variant of one layer on this machine and runtime."""
        options = self.options
        if self._machine is None:
            # onnxruntime keys keep their original form (no runtime field), so existing caches stay valid.
            self._machine = (machine_key() if options.runtime == "onnxruntime"
                             else machine_key(options.runtime, options.device))
        parts = {"machine": self._machine, "threads": options.threads,
                 "layer": _geometry_key(layer, input_shape), "method": method,
                 "rank": list(rank) if isinstance(rank, tuple) else rank}
        if options.runtime == "onnxruntime":
            parts["graph_optimization"] = options.graph_optimization
            parts["context"] = options.context
            if options.int8:  # only then: float keys keep their form, existing caches stay valid
                parts["int8"] = True
        else:
            parts.update(runtime=options.runtime, device=options.device)
        parts["timing"] = TIMING_FORM
        return LatencyCache.key(parts)

    def layer_times(self, layer: nn.Module, input_shape: Sequence[int],
                    variants: Sequence[tuple[str, Rank]]) -> tuple[float, dict[tuple[str, Rank], float]]:
        """(time of the original layer, {(method, rank): time}) in ms, timing only what the cache lacks.

        The original is timed again with every batch of new variants and each variant stored with its
        ratio to it; a variant's time is that ratio times the original's time: the reference ``calibrate``
        measured with every other layer, else the original's latest time. So variants timed at different
        times, under different load, still compare.
        """
        wanted = [(_ORIGINAL, None), *variants]
        keys = [self.key(layer, input_shape, m, r) for m, r in wanted]
        missing = [i for i in range(1, len(wanted)) if self.cache.ratio(keys[i]) is None]
        if missing or self.cache.get(keys[0]) is None:
            template = layer.to("cpu") if layer.weight.device.type != "cpu" else layer
            # Every variant timed together holds a live session with its own buffers (32 variants of a
            # 64-channel 256x256 conv of CRAFT: 3.9 GB); in groups under TIMING_BYTES, each group timed
            # with the original again, so every ratio is still to an original of the same rounds.
            size = max(1, TIMING_BYTES // _session_bytes(template, input_shape) - 2)
            unresolved = False
            for start in range(0, max(len(missing), 1), size):
                batch = [0, *missing[start:start + size]]
                times = self.timer([_float32_module(template, *wanted[i]) for i in batch], input_shape,
                                   self.options)
                self.measured += len(batch)
                # An original below the timer's resolution: no variant can be measured against it (each is
                # stored as the original's time, ratio 1, and the layer as unresolved).
                at_floor = times[0] <= getattr(times, "floor", 0.0)
                unresolved |= at_floor
                for i, ms in zip(batch, times):
                    self.cache.put(keys[i], ms, ratio=1.0 if at_floor else ms / times[0])
            if unresolved:
                self.cache.entries[keys[0]]["unresolved"] = True
            self.cache.save()
        original = self.reference.get(self._geometry(layer, input_shape)) or self.cache.get(keys[0])
        return original, {v: self.cache.ratio(k) * original for v, k in zip(variants, keys[1:])}

    def unresolved(self, layer: nn.Module, input_shape: Sequence[int]) -> bool:
        """The layer alone runs below the timer's resolution (its variants' times say nothing)."""
        entry = self.cache.entries.get(self.key(layer, input_shape, _ORIGINAL, None))
        return bool(entry and entry.get("unresolved"))

    def _geometry(self, layer: nn.Module, input_shape: Sequence[int]) -> str:
        return LatencyCache.key(_geometry_key(layer, input_shape))

    def calibrate(self, layers: Sequence[tuple[nn.Module, Sequence[int]]]) -> None:
        """Time every distinct original layer in the same interleaved rounds (onnxruntime): their times
        become the references the variants' ratios scale, so layers compare with each other too.

        Layers timed one after the other, each with its own variants, are timed under whatever load the
        machine had then: on a machine shared with other jobs a 3x3 conv of ResNet-18's layer4 can read
        34 ms where others of the same MACs read 2-6 ms, and the allocator would cut it for time it never
        saves. Not cached: the point is that they are measured together, now.
        """
        if self.options.runtime != "onnxruntime" or self.timer is not time_layers:
            return  # torch times, or test stubs
        distinct: dict[str, tuple[nn.Module, Sequence[int]]] = {}
        for layer, shape in layers:
            distinct.setdefault(self._geometry(layer, shape), (_float32_module(layer, _ORIGINAL, None), shape))
        if distinct:
            self.reference = _timed_in_groups(list(distinct.items()), self.options)

    def model_ms(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
        """Measured time of one run of a whole model, in ms (not cached: it depends on every weight's layout)."""
        return self.model_timer(module, inputs, self.options)

    def speedup(self, original: nn.Module, candidate: nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
        """Measured whole-model speedup of ``candidate`` over ``original``."""
        return self.comparer(original, candidate, inputs, self.options)


def _timed_in_groups(items: list[tuple[str, tuple[nn.Module, Sequence[int]]]],
                     options: LatencyOptions) -> dict[str, float]:
    """{key: ms} of every original layer, timed interleaved in groups under ``TIMING_BYTES`` of sessions.

    One session per layer (and its Identity) stays alive while a group is timed: CRAFT's 27 convs held
    +1.0 GB in one group, and a deeper network more. The layer with the largest buffers (the longest
    time, least noise) is timed in every group; each group's times are scaled by its time there to the
    first group's, so all layers still compare as if timed together.
    """
    sizes = [2 * _session_bytes(module, shape) for _, (module, shape) in items]
    anchor = max(range(len(items)), key=lambda i: sizes[i])
    others = [i for i in range(len(items)) if i != anchor]
    groups: list[list[int]] = [[]]
    room = TIMING_BYTES - sizes[anchor]
    used = 0
    for i in others:
        if groups[-1] and used + sizes[i] > room:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += sizes[i]
    out: dict[str, float] = {}
    first = None
    for group in groups:
        members = [anchor, *group]
        times = time_originals_onnxruntime([items[i][1] for i in members], options)
        first = times[0] if first is None else first
        scale = first / times[0] if times[0] > 0 else 1.0
        for i, ms in zip(members, times):
            out.setdefault(items[i][0], ms * scale)
    return out


def _float32_module(layer: nn.Module, method: str, rank: Rank | None) -> nn.Module:
    """A weightless float32 CPU twin of the layer, or of its replacement, for timing its structure."""

    twin = meta_twin(layer).to_empty(device="cpu").float()
    return twin if method == _ORIGINAL else get_method(method).build(twin, rank)
