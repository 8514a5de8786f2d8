"""Layer timings on another machine: the latency model's timers submitted to an executor's worker.

The reason to distribute a latency target is the target machine: the fits run anywhere, but a layer's
time only means something where the model will run. ``remote_latency_model(executor, latency)`` is a
``LatencyModel`` whose three timers (layer variants, whole models, one model) run as tasks on
``executor``; give it a Dask executor restricted to the deployment machine's worker (started there with a
``timing`` resource) and hand it to ``factorize`` through ``SharedWork.provide_latency_model``::

    # on the deployment machine:  dask worker tcp://scheduler:8786 --nthreads 1 --resources timing=1
    # on the fitting machines:    dask worker tcp://scheduler:8786 --resources fit=1
    client = distributed.Client("tcp://scheduler:8786")
    latency = {"threads": 1, "cache": False}          # this machine's cache would mix machines
    work = SharedWork()
    work.provide_latency_model(latency, remote_latency_model(client.get_executor(resources={"timing": 1}),
                                                             latency))
    fast = convfactor.factorize(model, {"rules": [{"method": "auto"}], "target": {"latency": 0.8}}, x,
                                calibration=data, latency=latency, shared=work,
                                executor=client.get_executor(resources={"fit": 1}))

Every timing call waits for its result (a layer's variants are timed interleaved, together, on the
worker), so the timing worker runs one thing at a time, as timing needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .auto.latency.model import LatencyModel, compare_models, time_layers, time_model
from .auto.latency.options import LatencyOptions

__all__ = ["RemoteTimers", "remote_latency_model"]


class RemoteTimers:
    """The latency model's three timers, each a task on ``executor`` (its result awaited)."""

    def __init__(self, executor: Any):
        self.executor = executor

    def layers(self, modules: Sequence[nn.Module], input_shape: Sequence[int], options: LatencyOptions) -> list[float]:
        return list(self.executor.submit(time_layers, list(modules), tuple(input_shape), options).result())

    def compare(self, original: nn.Module, candidate: nn.Module, inputs: tuple[torch.Tensor, ...],
                options: LatencyOptions) -> float:
        return float(self.executor.submit(compare_models, original, candidate, inputs, options).result())

    def model(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], options: LatencyOptions) -> float:
        return float(self.executor.submit(time_model, module, inputs, options).result())


def remote_latency_model(executor: Any, latency: LatencyOptions | Mapping[str, Any] | None = None) -> LatencyModel:
    """A ``LatencyModel`` with ``latency``'s options whose timings all run on ``executor``."""
    timers = RemoteTimers(executor)
    return LatencyModel(latency, timer=timers.layers, comparer=timers.compare, model_timer=timers.model)
