"""PyTorch eager timing: layers and whole models on CPU (threads set, then restored) or CUDA (synchronized).

Each module runs with random weights under ``torch.no_grad()``; on CPU ``torch.set_num_threads(threads)``
holds for the duration and the previous count is restored; on CUDA every call is bracketed by
``torch.cuda.synchronize()``. Whole models run as given (a copy when they must move to the device).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from .options import LatencyOptions
from .round_robin import fast_time, round_robin

__all__ = ["random_weights", "time_layers_torch", "compare_models_torch", "time_model_torch"]


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


def random_weights(module: nn.Module, seed: int) -> nn.Module:
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


def time_layers_torch(modules: Sequence[nn.Module], input_shape: Sequence[int],
                       options: LatencyOptions) -> list[float]:
    """PyTorch eager time (ms) of each module on ``input_shape``, interleaved, minus call overhead."""
    device = torch.device(options.device)
    x = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(0)).to(device)
    variants = [nn.Identity(), *(random_weights(m, seed=i + 1).to(device).eval() for i, m in enumerate(modules))]
    runs = [lambda module=module: module(x) for module in variants]
    with torch.no_grad(), _torch_threads(options):
        for run in runs:
            for _ in range(options.warmup):
                run()
        return round_robin(runs, options, _synchronizer(options.device))


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


def compare_models_torch(original: nn.Module, candidate: nn.Module, inputs: tuple[torch.Tensor, ...],
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


def time_model_torch(module: nn.Module, inputs: tuple[torch.Tensor, ...], options: LatencyOptions) -> float:
    """Time (ms) of one run of a whole model on ``inputs`` in PyTorch eager (``round_robin.fast_time``)."""
    run, sync = _on_device(module, inputs, options.device)
    times: list[float] = []
    with torch.no_grad(), _torch_threads(options):
        for _ in range(10):
            run()
        started = time.perf_counter()
        while len(times) < 30 or time.perf_counter() - started < options.verify_min_time / 2:
            times.append(_timed(run, sync))
    return fast_time(times)
