"""onnxruntime timing: one-layer ONNX graphs written directly, timed interleaved; whole models exported.

Each candidate (and the original layer) runs alone as a one-layer ONNX model on the layer's real input
shape. The graph is written directly from the module's stages (Conv / Gemm / MatMul nodes with the
stages' attributes, standard-normal weights), which takes milliseconds, where a torch exporter takes
seconds. Whole models are exported by ``convfactor.runtime.export`` (``exporter`` first, the other exporter
when it fails) and timed by ``convfactor.runtime.benchmarking`` (interleaved pairs, median of the pair ratios).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ...errors import ConvfactorError
from .int8_timing import quantized_for_timing
from .options import LatencyOptions
from .round_robin import fast_time, round_robin

__all__ = ["layer_onnx", "time_layers_onnxruntime", "time_originals_onnxruntime", "compare_models_onnxruntime",
           "time_model_onnxruntime"]

_OPSET = 18


def _pads(stage: nn.Module) -> list[int]:
    """ONNX ``pads`` (all begins, then all ends) for a Conv stage, resolving 'same' as PyTorch does."""
    dims = len(stage.kernel_size)
    if stage.padding == "same":
        total = [d * (k - 1) for d, k in zip(stage.dilation, stage.kernel_size)]
        begins = [t // 2 for t in total]
        return begins + [t - b for t, b in zip(total, begins)]
    padding = (0,) * dims if stage.padding == "valid" else tuple(stage.padding)
    return list(padding) * 2


def _stages(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [s for child in module.children() for s in _stages(child)]
    return [module]


def _channels_out(stages: Sequence[nn.Module], channels_in: int) -> int:
    for stage in reversed(stages):
        if isinstance(stage, (nn.Conv1d, nn.Conv2d)):
            return stage.out_channels
    return channels_in


def _neighbour(name: str, source: str, target: str, channels: int, dims: int) -> tuple[Any, Any]:
    """A depthwise 1x1 conv with unit weights (``source`` -> ``target``): a cheap channel-blocked neighbour."""
    weight = numpy_helper.from_array(np.ones((channels, 1) + (1,) * dims, np.float32), name)
    node = helper.make_node("Conv", [source, name], [target], kernel_shape=[1] * dims, group=channels)
    return node, weight


def layer_onnx(module: nn.Module, input_shape: Sequence[int], seed: int = 0,
               module_weights: bool = False, context: bool = False) -> onnx.ModelProto:
    """A float32 ONNX model of ``module`` (an Identity, a Conv1d/Conv2d/Linear or a Sequential of them).

    Args:
        module: what to time; only its structure matters unless ``module_weights``.
        input_shape: the input's shape, batch first.
        seed: seed of the generated weights.
        module_weights: use the module's own weights and biases (to check the graph against PyTorch).
            By default weights are standard normal scaled by 1/sqrt(fan-in) and biases zero: values do
            not change the time of a dense conv, but uninitialized memory can hold denormals, which would.
        context: put the module between two depthwise 1x1 convs (unit weights) on its input and output
            channels, as inside a network: onnxruntime runs them in its channel-blocked layout when the
            channel counts allow, so a form it cannot block pays the layout reorders around it that it
            pays in a real network (alone, the graph's own input and output reorders hide that cost).
            Conv inputs only; subtract the same graph around an Identity.
    Returns:
        The model (input ``x``); non-zero padding modes become a Pad node before the Conv.
    Raises:
        ConvfactorError: a stage of another type.
    """
    rng = np.random.default_rng(seed)

    def values(tensor: torch.Tensor | None, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        if module_weights and tensor is not None:
            return tensor.detach().cpu().float().numpy().reshape(shape)
        if fan_in == 0:  # a bias
            return np.zeros(shape, np.float32)
        return (rng.standard_normal(shape) / math.sqrt(max(1, fan_in))).astype(np.float32)

    nodes, initializers = [], []
    current = "x"
    stages = _stages(module)
    dims = len(input_shape) - 2
    wrap = context and dims in (1, 2) and not any(isinstance(s, nn.Linear) for s in stages)
    if wrap:
        node, weight = _neighbour("before_w", "x", "before", int(input_shape[1]), dims)
        nodes.append(node)
        initializers.append(weight)
        current = "before"
    for index, stage in enumerate(stages):
        out = f"y{index}"
        if isinstance(stage, nn.Identity):
            nodes.append(helper.make_node("Identity", [current], [out]))
        elif isinstance(stage, (nn.Conv1d, nn.Conv2d)):
            shape = tuple(stage.weight.shape)
            weight = values(stage.weight, shape, math.prod(shape[1:]))
            initializers.append(numpy_helper.from_array(weight, f"w{index}"))
            inputs = [current, f"w{index}"]
            if stage.bias is not None:
                initializers.append(numpy_helper.from_array(values(stage.bias, (stage.out_channels,), 0), f"b{index}"))
                inputs.append(f"b{index}")
            pads = _pads(stage)
            if stage.padding_mode != "zeros" and any(pads):
                mode = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}[stage.padding_mode]
                dims = len(stage.kernel_size)
                full = [0, 0] + pads[:dims] + [0, 0] + pads[dims:]
                initializers.append(numpy_helper.from_array(np.asarray(full, np.int64), f"p{index}"))
                nodes.append(helper.make_node("Pad", [current, f"p{index}"], [f"padded{index}"], mode=mode))
                inputs[0], pads = f"padded{index}", [0] * len(pads)
            nodes.append(helper.make_node("Conv", inputs, [out], kernel_shape=list(stage.kernel_size),
                                          strides=list(stage.stride), dilations=list(stage.dilation),
                                          pads=pads, group=stage.groups))
        elif isinstance(stage, nn.Linear):
            shape = (stage.out_features, stage.in_features)
            weight = np.ascontiguousarray(values(stage.weight, shape, stage.in_features).T)  # x @ W^T
            initializers.append(numpy_helper.from_array(weight, f"w{index}"))
            if stage.bias is None:
                nodes.append(helper.make_node("MatMul", [current, f"w{index}"], [out]))
            else:
                initializers.append(numpy_helper.from_array(values(stage.bias, (stage.out_features,), 0), f"b{index}"))
                nodes.append(helper.make_node("MatMul", [current, f"w{index}"], [f"m{index}"]))
                nodes.append(helper.make_node("Add", [f"m{index}", f"b{index}"], [out]))
        else:
            raise ConvfactorError(f"the latency model cannot time a {type(stage).__name__} stage")
        current = out
    if wrap:
        node, weight = _neighbour("after_w", current, "after", _channels_out(stages, int(input_shape[1])), dims)
        nodes.append(node)
        initializers.append(weight)
        current = "after"
    graph = helper.make_graph(
        nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = 9
    return model


def _warm_runs(variants: Sequence[tuple[nn.Module, Sequence[int]]], options: LatencyOptions) -> list[Callable[[], Any]]:
    """A warmed-up zero-argument onnxruntime call per (module, input shape)."""
    from ...runtime.sessions import make_session

    runs = []
    with tempfile.TemporaryDirectory(prefix="convfactor-latency-") as scratch:
        for index, (module, shape) in enumerate(variants):
            path = Path(scratch) / f"v{index}.onnx"
            onnx.save(layer_onnx(module, shape, seed=index, context=options.context), str(path))
            x = np.random.default_rng(0).standard_normal(tuple(shape)).astype(np.float32)
            if options.int8:  # timed as the int8 graph the deployed model will run
                path = quantized_for_timing(path, [x], preprocess=False)
            session = make_session(path, threads=options.threads, graph_optimization=options.graph_optimization)
            feed = {session.get_inputs()[0].name: x}
            for _ in range(options.warmup):
                session.run(None, feed)
            runs.append(lambda session=session, feed=feed: session.run(None, feed))
    return runs


def time_layers_onnxruntime(modules: Sequence[nn.Module], input_shape: Sequence[int],
                            options: LatencyOptions) -> list[float]:
    """onnxruntime time (ms) of each module on ``input_shape``, interleaved, minus call overhead."""
    return round_robin(_warm_runs([(nn.Identity(), input_shape), *((m, input_shape) for m in modules)], options),
                       options)


def time_originals_onnxruntime(layers: Sequence[tuple[nn.Module, Sequence[int]]], options: LatencyOptions,
                               max_seconds: float = 30.0) -> list[float]:
    """onnxruntime time (ms) of each layer on its own input shape, all interleaved in the same rounds.

    Layers timed one after the other are timed under whatever load the machine had at each moment: timed
    together, their times compare. Each layer's overhead (an Identity on its input, with the same
    neighbours) runs in the same rounds and is subtracted.
    """
    variants = [v for layer, shape in layers for v in ((nn.Identity(), shape), (layer, shape))]
    budget = replace(options, max_seconds_per_layer=min(max_seconds, options.max_seconds_per_layer * len(layers)))
    times = round_robin([lambda: None, *_warm_runs(variants, options)], budget)
    return [max(times[2 * i + 1] - times[2 * i], 1e-4) for i in range(len(layers))]


def compare_models_onnxruntime(original: nn.Module, candidate: nn.Module, inputs: tuple[torch.Tensor, ...],
                               options: LatencyOptions) -> float:
    """Speedup of ``candidate`` over ``original`` in onnxruntime (median of interleaved pair ratios)."""
    from ...runtime.benchmarking import benchmark
    from ...runtime.exporters import exporter_order

    with tempfile.TemporaryDirectory(prefix="convfactor-latency-") as scratch:
        models: list[Any] = [original, candidate]
        if options.int8:  # both exported, then quantized as the deployed model will be
            from ...runtime.sessions import prepare_onnx

            models = [quantized_for_timing(prepare_onnx(m, inputs, scratch, name,
                                                        exporter=exporter_order(options.exporter)).path,
                                           inputs, preprocess=True)
                      for m, name in ((original, "original"), (candidate, "candidate"))]
        report = benchmark(*models, inputs, threads=options.threads,
                           graph_optimization=options.graph_optimization, warmup=10, repeats=30,
                           min_time=options.verify_min_time, progress=False,
                           exporter=exporter_order(options.exporter))
    return report.results[0].speedup


def time_model_onnxruntime(module: nn.Module, inputs: tuple[torch.Tensor, ...], options: LatencyOptions) -> float:
    """Time (ms) of one run of a whole model on ``inputs`` in onnxruntime (``round_robin.fast_time``)."""
    from ...runtime.export import export_onnx
    from ...runtime.exporters import exporter_order
    from ...runtime.sessions import make_session, session_feeds

    with tempfile.TemporaryDirectory(prefix="convfactor-latency-") as scratch:
        path = Path(scratch) / "model.onnx"
        export_onnx(module, inputs, path, exporter=exporter_order(options.exporter))
        if options.int8:
            path = quantized_for_timing(path, inputs, preprocess=True)
        session = make_session(path, threads=options.threads, graph_optimization=options.graph_optimization)
    feeds = session_feeds(session, inputs)
    for _ in range(10):
        session.run(None, feeds)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < 30 or time.perf_counter() - started < options.verify_min_time / 2:
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return fast_time(times)
