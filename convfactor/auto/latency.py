"""Latency model: measured time of each candidate replacement in a target runtime, with a disk cache.

Two targets (``latency={"runtime": ..., "device": ...}``):

- ``runtime="onnxruntime"`` (default), CPU: each candidate (and the original layer) runs alone as a
  one-layer ONNX model on the layer's real input shape. The graph is written directly from the module's
  stages (Conv / Gemm / MatMul nodes with the stages' attributes, standard-normal weights), which takes
  milliseconds, where a torch exporter takes seconds.
- ``runtime="torch"``, ``device="cpu"`` or ``"cuda"``: each candidate runs as a PyTorch eager module
  (random weights, ``torch.no_grad()``; on CPU ``torch.set_num_threads(threads)`` for the duration, then
  restored; on CUDA every call is bracketed by ``torch.cuda.synchronize()``).

In both, all variants of one layer are timed in the same process, interleaved round-robin, and an empty
(Identity) variant on the same input measures the per-call overhead, which is subtracted.

The cache is one JSON file (default ``~/.cache/convfactor/latency.json``; ``$CONVFACTOR_CACHE_DIR`` or
``latency={"cache": path}`` move it). An entry's key holds everything the time depends on: the machine
(CPU model, usable and logical cores), the runtime and its version, threads, the layer geometry and input
shape, the method and the rank. onnxruntime keys hold the onnxruntime version and the graph optimization
level (their form predates the torch target and is unchanged, so older caches stay valid); torch keys hold
``"runtime": "torch"``, the device (and GPU name on CUDA) and the torch version. A key therefore never
matches a timing taken under other conditions or in the other runtime, and a warm cache makes a repeated
resolution free.

Whole models (the final check that the factorized network is faster): for onnxruntime they are exported
by ``convfactor.runtime.export`` (``exporter`` first, the other exporter when it fails) and timed by
``convfactor.runtime.benchmarking``; for torch the two modules run in
eager mode. Both time interleaved pairs and take the median of the per-pair ratios.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ..errors import ConvfactorError
from ..geometry import LayerGeometry
from ..methods import get_method
from ..methods.base import Rank

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

CACHE_FORMAT = "convfactor-latency/1"
_ORIGINAL, _OVERHEAD = "original", "overhead"
_OPSET = 18
RUNTIMES = ("onnxruntime", "torch")
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class LatencyOptions:
    """Options of the latency model (the ``latency=`` mapping of ``factorize``).

    Attributes:
        runtime: what the times are measured in: "onnxruntime" (CPU) or "torch" (PyTorch eager).
        device: "cpu", or "cuda" (runtime "torch" only; needs ``torch.cuda.is_available()``).
        threads: onnxruntime intra-op threads, or ``torch.set_num_threads`` for torch on CPU.
        cache: the JSON cache file; None: ``default_cache_path()``; False: no cache.
        graph_optimization: onnxruntime level ("disabled", "basic", "extended", "all").
        warmup: untimed runs of each variant before timing.
        repeats: timed rounds per layer (each round runs every variant once).
        max_seconds_per_layer: stop timing a layer's variants after this long (at least 3 rounds).
        max_candidates: per layer and method, at most this many ranks are timed (spread over the grid).
        verify: time the whole factorized model against the original and fall back when it is not faster.
        verify_min_time: seconds of interleaved pairs per whole-model comparison.
        verify_rounds: whole-model comparisons allowed while dropping layers.
        exporter: torch exporter tried first for whole models ("torchscript" is fast; "dynamo"; "auto" means
            dynamo); the other one is tried when it fails. onnxruntime only.
    """

    runtime: str = "onnxruntime"
    device: str = "cpu"
    threads: int = 1
    cache: str | os.PathLike | bool | None = None
    graph_optimization: str = "all"
    warmup: int = 3
    repeats: int = 25
    max_seconds_per_layer: float = 2.0
    max_candidates: int = 8
    verify: bool = True
    verify_min_time: float = 1.0
    verify_rounds: int = 5
    exporter: str = "torchscript"

    @classmethod
    def from_any(cls, spec: LatencyOptions | Mapping[str, Any] | None) -> LatencyOptions:
        """Options from None, a LatencyOptions, or a mapping of its field names.

        Raises:
            ConvfactorError: an unknown key or a bad value.
        """
        if spec is None:
            return cls()
        if isinstance(spec, LatencyOptions):
            return spec
        if not isinstance(spec, Mapping):
            raise ConvfactorError(f"latency options must be a mapping, got {type(spec).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = [k for k in spec if k not in known]
        if unknown:
            raise ConvfactorError(f"latency: unknown option {unknown[0]!r} (known: {', '.join(sorted(known))})")
        options = cls(**spec)
        for name in ("threads", "repeats", "max_candidates", "verify_rounds"):
            value = getattr(options, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConvfactorError(f"latency: {name} must be a positive int, got {value!r}")
        if options.runtime not in RUNTIMES:
            raise ConvfactorError(f"latency: unknown runtime {options.runtime!r} (known: {', '.join(RUNTIMES)})")
        from ..runtime.exporters import EXPORTERS

        if options.exporter not in EXPORTERS:
            raise ConvfactorError(f"latency: unknown exporter {options.exporter!r} (known: {', '.join(EXPORTERS)})")
        if options.device not in DEVICES:
            raise ConvfactorError(f"latency: unknown device {options.device!r} (known: {', '.join(DEVICES)})")
        if options.device == "cuda":
            if options.runtime != "torch":
                raise ConvfactorError(f"latency: device 'cuda' needs runtime 'torch' (got {options.runtime!r})")
            if not torch.cuda.is_available():
                raise ConvfactorError("latency: device 'cuda' was asked for but torch.cuda.is_available() is False")
        return options


def default_cache_path() -> Path:
    """``$CONVFACTOR_CACHE_DIR/latency.json``, else ``~/.cache/convfactor/latency.json``."""
    directory = os.environ.get("CONVFACTOR_CACHE_DIR")
    base = Path(directory) if directory else Path.home() / ".cache" / "convfactor"
    return base / "latency.json"


def machine_key(runtime: str = "onnxruntime", device: str = "cpu") -> dict[str, Any]:
    """What identifies the machine and runtime a timing is valid for.

    Args:
        runtime: "onnxruntime" (its key form is unchanged since the first cache format) or "torch".
        device: "cpu" or "cuda" (torch only).
    Returns:
        CPU model and cores, plus the onnxruntime version, or the torch version and device (and GPU name).
    """
    from ..runtime.benchmarking import available_cores, cpu_model

    key: dict[str, Any] = {"cpu": cpu_model(), "cores": available_cores(), "logical_cores": os.cpu_count() or 1}
    if runtime == "onnxruntime":
        import onnxruntime

        return {**key, "onnxruntime": onnxruntime.__version__}
    key.update(runtime=runtime, torch=torch.__version__, device=device)
    if device == "cuda":
        key.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return key


class LatencyCache:
    """Measured times by key, persisted as JSON; writes merge with what is on disk, atomically.

    Args:
        path: the JSON file, or None for an in-memory cache.
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = None if path is None else Path(path)
        self.entries: dict[str, dict[str, Any]] = {}
        self.load_error: str | None = None
        if self.path is not None:
            self.entries = self._read()

    @staticmethod
    def key(parts: Mapping[str, Any]) -> str:
        """A canonical string for a key mapping (sorted, compact JSON)."""
        return json.dumps(parts, sort_keys=True, separators=(",", ":"))

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as bad:
            self.load_error = f"ignored unreadable latency cache {self.path}: {bad}"
            return {}
        entries = data.get("entries") if isinstance(data, dict) else None
        if entries is None or data.get("format") != CACHE_FORMAT or not isinstance(entries, dict):
            self.load_error = f"ignored latency cache {self.path} of another format"
            return {}
        return entries

    def get(self, key: str) -> float | None:
        entry = self.entries.get(key)
        return None if entry is None else float(entry["ms"])

    def put(self, key: str, ms: float) -> None:
        self.entries[key] = {"ms": float(ms), "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def save(self) -> None:
        """Merge with the file's current entries (another process may have added some) and write atomically.

        The read-merge-write holds an exclusive lock on ``<cache>.lock``, so two processes saving at once
        keep each other's entries (without the lock both would read, and the last rename would win).
        """
        if self.path is None:
            return
        from ..files.atomic import atomic_write_text

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _cache_lock(self.path):
            merged = {**(self._read() if self.path.exists() else {}), **self.entries}
            self.entries = merged
            atomic_write_text(self.path, json.dumps({"format": CACHE_FORMAT, "entries": merged}, indent=1) + "\n",
                              force=True)


@contextmanager
def _cache_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path``'s sidecar ``.lock`` file (POSIX ``flock``; blocks until free).

    The lock file is never deleted (deleting it would let a waiting process lock a stale inode). Where
    ``fcntl`` does not exist (Windows) saves are only atomic, not merged under a lock.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# -- one-layer ONNX graphs -------------------------------------------------------------------------


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


def layer_onnx(module: nn.Module, input_shape: Sequence[int], seed: int = 0,
               module_weights: bool = False) -> onnx.ModelProto:
    """A float32 ONNX model of ``module`` (an Identity, a Conv1d/Conv2d/Linear or a Sequential of them).

    Args:
        module: what to time; only its structure matters unless ``module_weights``.
        input_shape: the input's shape, batch first.
        seed: seed of the generated weights.
        module_weights: use the module's own weights and biases (to check the graph against PyTorch).
            By default weights are standard normal scaled by 1/sqrt(fan-in) and biases zero: values do
            not change the time of a dense conv, but uninitialized memory can hold denormals, which would.
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
    for index, stage in enumerate(_stages(module)):
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
    graph = helper.make_graph(
        nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = 9
    return model


# -- the model -------------------------------------------------------------------------------------

# (modules, input shape, options) -> median milliseconds per module, overhead already subtracted.
LayerTimer = Callable[[Sequence[nn.Module], Sequence[int], LatencyOptions], list[float]]
# (original, candidate, example inputs, options) -> speedup of the candidate (> 1: faster).
ModelComparer = Callable[[nn.Module, nn.Module, tuple[torch.Tensor, ...], LatencyOptions], float]
# (model, example inputs, options) -> median milliseconds of one run.
ModelTimer = Callable[[nn.Module, tuple[torch.Tensor, ...], LatencyOptions], float]


def time_layers(modules: Sequence[nn.Module], input_shape: Sequence[int], options: LatencyOptions) -> list[float]:
    """Median time (ms) of each module on ``input_shape`` in ``options.runtime``, interleaved, minus call overhead.

    Args:
        modules: what to time (an Identity, a Conv1d/Conv2d/Linear or a Sequential of them); only their
            structure matters, weights are replaced by random ones.
        input_shape: the input's shape, batch first.
        options: runtime, device, threads, warmup, repeats and the time limit.
    Returns:
        One time per module, in ms, floored at 1e-4 so that no replacement looks free.
    """
    if options.runtime == "torch":
        return _time_layers_torch(modules, input_shape, options)
    return _time_layers_onnxruntime(modules, input_shape, options)


def _time_layers_onnxruntime(modules: Sequence[nn.Module], input_shape: Sequence[int],
                             options: LatencyOptions) -> list[float]:
    """Median onnxruntime time (ms) of each module on ``input_shape``, interleaved, minus call overhead."""
    from ..runtime.sessions import make_session

    x = np.random.default_rng(0).standard_normal(tuple(input_shape)).astype(np.float32)
    variants = [nn.Identity(), *modules]
    with tempfile.TemporaryDirectory(prefix="convfactor-latency-") as scratch:
        sessions = []
        for index, module in enumerate(variants):
            path = Path(scratch) / f"v{index}.onnx"
            onnx.save(layer_onnx(module, input_shape, seed=index), str(path))
            sessions.append(make_session(path, threads=options.threads,
                                         graph_optimization=options.graph_optimization))
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for session, feed in zip(sessions, feeds):
        for _ in range(options.warmup):
            session.run(None, feed)
    runs = [lambda session=session, feed=feed: session.run(None, feed) for session, feed in zip(sessions, feeds)]
    return _round_robin(runs, options)


def _round_robin(runs: Sequence[Callable[[], Any]], options: LatencyOptions,
                 synchronize: Callable[[], None] | None = None) -> list[float]:
    """Median ms of ``runs[1:]`` minus that of ``runs[0]`` (the overhead), timed interleaved round-robin.

    Args:
        runs: zero-argument calls, the first one the empty (Identity) variant; already warmed up.
        options: repeats and max_seconds_per_layer.
        synchronize: called before starting and before stopping the clock (CUDA's asynchronous launches).
    """
    sync = synchronize or (lambda: None)
    times: list[list[float]] = [[] for _ in runs]
    started = time.perf_counter()
    for round_index in range(options.repeats):
        # Rotate the order each round so drift and cache effects spread evenly over the variants.
        shift = round_index % len(runs)
        for i in list(range(shift, len(runs))) + list(range(shift)):
            sync()
            t0 = time.perf_counter()
            runs[i]()
            sync()
            times[i].append(time.perf_counter() - t0)
        if round_index >= 2 and time.perf_counter() - started > options.max_seconds_per_layer:
            break
    medians = [float(np.median(t)) * 1e3 for t in times]
    overhead = medians[0]
    # A floor keeps every time positive (cost 0 would make a replacement look free).
    return [max(m - overhead, 1e-4) for m in medians[1:]]


@contextmanager
def _torch_threads(options: LatencyOptions) -> Iterator[None]:
    """``torch.set_num_threads(options.threads)`` on CPU for the duration; the previous count is restored."""
    if options.device != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(options.threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _synchronizer(device: str) -> Callable[[], None] | None:
    return torch.cuda.synchronize if device == "cuda" else None


def _random_weights(module: nn.Module, seed: int) -> nn.Module:
    """A float32 copy of ``module`` with weights N(0, 1/fan-in) and zero biases.

    Values do not change the time of a dense conv, but uninitialized memory can hold denormals, which would.
    """
    generator = torch.Generator().manual_seed(seed)
    module = copy.deepcopy(module).float()
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias" or parameter.dim() < 2:
                parameter.zero_()
            else:
                fan_in = max(1, parameter[0].numel())
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / math.sqrt(fan_in))
    return module


def _time_layers_torch(modules: Sequence[nn.Module], input_shape: Sequence[int],
                       options: LatencyOptions) -> list[float]:
    """Median PyTorch eager time (ms) of each module on ``input_shape``, interleaved, minus call overhead."""
    device = torch.device(options.device)
    x = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(0)).to(device)
    variants = [nn.Identity(), *(_random_weights(m, seed=i + 1).to(device).eval() for i, m in enumerate(modules))]
    runs = [lambda module=module: module(x) for module in variants]
    with torch.no_grad(), _torch_threads(options):
        for run in runs:
            for _ in range(options.warmup):
                run()
        return _round_robin(runs, options, _synchronizer(options.device))


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
        return _compare_models_torch(original, candidate, inputs, options)
    from ..runtime.benchmarking import benchmark
    from ..runtime.exporters import exporter_order

    report = benchmark(original, candidate, inputs, threads=options.threads,
                       graph_optimization=options.graph_optimization, warmup=10, repeats=30,
                       min_time=options.verify_min_time, progress=False,
                       exporter=exporter_order(options.exporter))
    return report.results[0].speedup


def time_model(module: nn.Module, inputs: tuple[torch.Tensor, ...], options: LatencyOptions) -> float:
    """Median time (ms) of one run of a whole model on ``inputs`` in ``options.runtime``.

    Args:
        module: the model.
        inputs: its example inputs.
        options: runtime, device, threads and verify_min_time (half of it is spent timing, at least 30 runs).
    Returns:
        The median time of one run, in ms.
    """
    if options.runtime == "torch":
        return _time_model_torch(module, inputs, options)
    from ..runtime.export import export_onnx
    from ..runtime.exporters import exporter_order
    from ..runtime.sessions import make_session, session_feeds

    with tempfile.TemporaryDirectory(prefix="convfactor-latency-") as scratch:
        path = Path(scratch) / "model.onnx"
        export_onnx(module, inputs, path, exporter=exporter_order(options.exporter))
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
    return float(np.median(times)) * 1e3


def _on_device(module: nn.Module, inputs: tuple[Any, ...],
               device: str) -> tuple[Callable[[], Any], Callable[[], None] | None]:
    """A zero-argument call of ``module`` on ``inputs`` on ``device`` (a copy when it must move), and its sync."""
    if device != "cpu":
        module = copy.deepcopy(module).to(device)  # the caller's model stays where it is
    inputs = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs)
    return (lambda: module(*inputs)), _synchronizer(device)


def _timed(run: Callable[[], Any], synchronize: Callable[[], None] | None) -> float:
    """Seconds of one call of ``run``, synchronized before and after on CUDA."""
    if synchronize:
        synchronize()
    t0 = time.perf_counter()
    run()
    if synchronize:
        synchronize()
    return time.perf_counter() - t0


def _compare_models_torch(original: nn.Module, candidate: nn.Module, inputs: tuple[torch.Tensor, ...],
                          options: LatencyOptions) -> float:
    """Speedup of ``candidate`` over ``original`` in PyTorch eager: pairs (A, B), (B, A), ..., median ratio."""
    run_a, sync = _on_device(original, inputs, options.device)
    run_b, _ = _on_device(candidate, inputs, options.device)
    runs = (run_a, run_b)
    times: list[list[float]] = [[], []]
    with torch.no_grad(), _torch_threads(options):
        for _ in range(10):
            run_a(), run_b()
        started = time.perf_counter()
        while len(times[0]) < 30 or time.perf_counter() - started < options.verify_min_time:
            for index in ((0, 1) if len(times[0]) % 2 == 0 else (1, 0)):
                times[index].append(_timed(runs[index], sync))
    return float(np.median(np.asarray(times[0]) / np.asarray(times[1])))


def _time_model_torch(module: nn.Module, inputs: tuple[torch.Tensor, ...], options: LatencyOptions) -> float:
    """Median PyTorch eager time (ms) of one run of a whole model on ``inputs``."""
    run, sync = _on_device(module, inputs, options.device)
    times: list[float] = []
    with torch.no_grad(), _torch_threads(options):
        for _ in range(10):
            run()
        started = time.perf_counter()
        while len(times) < 30 or time.perf_counter() - started < options.verify_min_time / 2:
            times.append(_timed(run, sync))
    return float(np.median(times)) * 1e3


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
        else:
            parts.update(runtime=options.runtime, device=options.device)
        return LatencyCache.key(parts)

    def layer_times(self, layer: nn.Module, input_shape: Sequence[int],
                    variants: Sequence[tuple[str, Rank]]) -> tuple[float, dict[tuple[str, Rank], float]]:
        """(time of the original layer, {(method, rank): time}) in ms, timing only what the cache lacks."""
        wanted = [(_ORIGINAL, None), *variants]
        keys = [self.key(layer, input_shape, m, r) for m, r in wanted]
        missing = [i for i, k in enumerate(keys) if self.cache.get(k) is None]
        if missing:
            template = layer.to("cpu") if layer.weight.device.type != "cpu" else layer
            modules = [_float32_module(template, *wanted[i]) for i in missing]
            times = self.timer(modules, input_shape, self.options)
            self.measured += len(missing)
            for i, ms in zip(missing, times):
                self.cache.put(keys[i], ms)
            self.cache.save()
        values = [self.cache.get(k) for k in keys]
        return values[0], {v: t for v, t in zip(variants, values[1:])}

    def model_ms(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
        """Measured time of one run of a whole model, in ms (not cached: it depends on every weight's layout)."""
        return self.model_timer(module, inputs, self.options)

    def speedup(self, original: nn.Module, candidate: nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
        """Measured whole-model speedup of ``candidate`` over ``original``."""
        return self.comparer(original, candidate, inputs, self.options)


def _float32_module(layer: nn.Module, method: str, rank: Rank | None) -> nn.Module:
    """A weightless float32 CPU twin of the layer, or of its replacement, for timing its structure."""
    from .candidates import meta_twin

    twin = meta_twin(layer).to_empty(device="cpu").float()
    return twin if method == _ORIGINAL else get_method(method).build(twin, rank)
