"""The executor seam: serial, a thread pool and a Dask cluster of two worker processes give the same result.

Candidate scoring and sensitivity probes are tasks whose results are applied in layer order, so where they
ran cannot change the allocation, nor any number it was made from.
"""

from concurrent.futures import ThreadPoolExecutor

import pytest

import convfactor
from convfactor import get_report
from convfactor.executor import SerialExecutor, ordered_results, pool_size
from tests.sweeps.conftest import FAST

POLICY = {"rules": [{"method": "auto"}], "target": {"macs": 0.45}}


def _resolution(net, data, executor):
    report = get_report(convfactor.factorize(net, POLICY, data[:1], calibration=data, auto_options=FAST,
                                             executor=executor))
    return report.policy["resolved"], report.extra["auto"]["layers"]


def _sweep_allocations(net, data, executor):
    result = convfactor.sweep(net, ["macs=0.6,0.3", "params=0.5"], data[:1], calibration=data, auto_options=FAST,
                              baseline=None, bench={"skip": True}, executor=executor)
    return [(p.label, p.allocation, p.rel_error) for p in result.points]


def test_results_come_back_in_submission_order_whatever_finishes_first():
    import time

    def slow_first(i):
        time.sleep(0.05 * (3 - i))
        return i

    with ThreadPoolExecutor(3) as pool:
        assert ordered_results(pool, slow_first, [(0,), (1,), (2,)]) == [0, 1, 2]
    assert ordered_results(None, slow_first, [(2,), (1,)]) == [2, 1]
    failed = SerialExecutor().submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failed.result()
    assert 1 <= pool_size(64) <= 64 and pool_size(1) == 1


@pytest.fixture(scope="module")
def serial(net, data):
    """One auto run and one sweep, serially."""
    return _resolution(net, data, None), _sweep_allocations(net, data, None)


def test_a_thread_pool_gives_the_serial_allocation_and_numbers(net, data, serial):
    with ThreadPoolExecutor(2) as pool:
        assert (_resolution(net, data, pool), _sweep_allocations(net, data, pool)) == serial


def test_a_dask_cluster_of_two_processes_gives_the_serial_allocation(net, data, serial):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) \
            as cluster, distributed.Client(cluster) as client:
        executor = client.get_executor()
        assert (_resolution(net, data, executor), _sweep_allocations(net, data, executor)) == serial


def test_ordered_results_keeps_at_most_in_flight_tasks_submitted():
    from concurrent.futures import Future

    from convfactor.executor import IN_FLIGHT

    class Deferred:
        """Runs nothing until a result is asked: counts what is submitted and not yet collected."""

        def __init__(self):
            self.outstanding = self.most = 0

        def submit(self, fn, *args):
            self.outstanding += 1
            self.most = max(self.most, self.outstanding)
            future = Future()
            deferred = self

            def result(timeout=None):
                deferred.outstanding -= 1
                return fn(*args)

            future.result = result
            return future

    pool = Deferred()
    calls = [(i,) for i in range(3 * IN_FLIGHT + 1)]
    assert ordered_results(pool, lambda i: i * i, calls) == [i * i for i in range(len(calls))]
    assert pool.most == IN_FLIGHT and pool.outstanding == 0
    assert ordered_results(Deferred(), lambda i: -i, calls, in_flight=1) == [-i for i in range(len(calls))]
