"""Layer timings submitted to another executor's worker: the recipe for timing on a deployment machine."""

import pytest
import torch

import convfactor
from convfactor.auto.shared import SharedWork
from convfactor.executor import SerialExecutor
from convfactor.remote_timing import remote_latency_model
from tests.cli_models import TinyNet, randomized

LATENCY = {"cache": False, "repeats": 3, "warmup": 1, "max_seconds_per_layer": 0.05, "max_candidates": 2,
           "verify": False}
POLICY = {"rules": [{"method": "spatial_svd"}], "target": {"latency": 0.8}}


class Counting(SerialExecutor):
    """Runs each task here and counts them by function (a stand-in for the deployment machine's worker)."""

    def __init__(self):
        self.calls = {}

    def submit(self, fn, /, *args, **kwargs):
        self.calls[fn.__name__] = self.calls.get(fn.__name__, 0) + 1
        return super().submit(fn, *args, **kwargs)


def test_every_layer_timing_of_a_latency_target_runs_on_the_timing_executor():
    timing = Counting()
    work = SharedWork()
    work.provide_latency_model(LATENCY, remote_latency_model(timing, LATENCY))
    model, x = randomized(TinyNet()), torch.randn(1, 3, 16, 16)
    fast = convfactor.factorize(model, POLICY, x, latency=LATENCY, shared=work)
    info = convfactor.get_report(fast).extra["auto"]
    assert timing.calls.get("time_layers", 0) >= 3  # one batch of variants per open layer at least
    assert info["latency"]["measured_variants"] > 0 and set(timing.calls) <= {"time_layers", "compare_models",
                                                                              "time_model"}


def test_a_dask_worker_tagged_for_timing_times_the_layers():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None,
                                  resources={"timing": 1}) as cluster, distributed.Client(cluster) as client:
        work = SharedWork()
        work.provide_latency_model(LATENCY, remote_latency_model(client.get_executor(resources={"timing": 1}),
                                                                 LATENCY))
        with distributed.get_task_stream(client) as stream:
            fast = convfactor.factorize(randomized(TinyNet()), POLICY, torch.randn(1, 3, 16, 16), latency=LATENCY,
                                        shared=work)
        ran = [task["key"] for task in stream.data]
        assert sum(key.startswith("time_layers") for key in ran) >= 3
        assert convfactor.get_report(fast).extra["auto"]["latency"]["measured_variants"] > 0
