"""The latency cache shared by processes: concurrent saves keep every process's entries."""

import json
import multiprocessing
import time

import pytest

from convfactor.auto.latency.model import CACHE_FORMAT, LatencyCache


def _writer(path, name, ready, go):
    """Put this process's keys, then save when told to; reading the file is slowed down so that,
    without a lock, both processes read before either writes and the second write drops the first's
    entries."""
    cache = LatencyCache(path)
    read = cache._read

    def slow_read():
        entries = read()
        time.sleep(0.5)
        return entries

    cache._read = slow_read
    for i in range(3):
        cache.put(f"{name}-{i}", i + 1.0)
    ready.set()
    go.wait(60)
    cache.save()


def test_two_processes_saving_at_once_keep_each_others_entries(tmp_path):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork (a spawned process would import torch again: seconds)")
    context = multiprocessing.get_context("fork")
    path = tmp_path / "latency.json"
    path.write_text(json.dumps({"format": CACHE_FORMAT, "entries": {}}))
    assert LatencyCache(path).load_error is None  # a valid, empty cache
    go = context.Event()
    readies = {name: context.Event() for name in "ab"}
    writers = [context.Process(target=_writer, args=(path, name, readies[name], go)) for name in "ab"]
    for writer in writers:
        writer.start()
    assert all(ready.wait(60) for ready in readies.values())
    go.set()
    for writer in writers:
        writer.join(60)
        assert writer.exitcode == 0
    entries = json.loads(path.read_text())["entries"]
    assert sorted(entries) == [f"{n}-{i}" for n in "ab" for i in range(3)]
    assert [entries[f"b-{i}"]["ms"] for i in range(3)] == [1.0, 2.0, 3.0]
