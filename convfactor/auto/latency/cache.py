"""The latency cache: measured times by key in one JSON file, merged under a lock when saved.

The file defaults to ``~/.cache/convfactor/latency.json`` (``$CONVFACTOR_CACHE_DIR`` or
``latency={"cache": path}`` move it). An entry's key holds everything the time depends on: the machine
(CPU model, usable and logical cores), the runtime and its version, threads, the layer geometry and input
shape, the method and the rank. onnxruntime keys hold the onnxruntime version, the graph optimization
level and whether layers were timed between blocked neighbours (``context``); torch keys hold
``"runtime": "torch"``, the device (and GPU name on CUDA) and the torch version. A key therefore never
matches a timing taken under other conditions or in the other runtime, and a warm cache makes a repeated
resolution free. Entries hold the time and the ratio to the original layer timed in the same rounds
(``timing`` 2 in the key; entries of the first form, timed one by one, are not reused).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

__all__ = ["CACHE_FORMAT", "LatencyCache", "default_cache_path", "machine_key"]

CACHE_FORMAT = "convfactor-latency/1"


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
    from ...runtime.benchmarking import available_cores, cpu_model

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

    def ratio(self, key: str) -> float | None:
        """The entry's time relative to its layer's original timed in the same rounds (None: not stored)."""
        entry = self.entries.get(key)
        return None if entry is None or entry.get("ratio") is None else float(entry["ratio"])

    def put(self, key: str, ms: float, ratio: float | None = None) -> None:
        self.entries[key] = {"ms": float(ms), "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if ratio is not None:
            self.entries[key]["ratio"] = float(ratio)

    def save(self) -> None:
        """Merge with the file's current entries (another process may have added some) and write atomically.

        The read-merge-write holds an exclusive lock on ``<cache>.lock``, so two processes saving at once
        keep each other's entries (without the lock both would read, and the last rename would win).
        """
        if self.path is None:
            return
        from ...files.atomic import atomic_write_text

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
