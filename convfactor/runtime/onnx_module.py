"""An ONNX model run by onnxruntime behind ``nn.Module``'s call, so a torch measurement can run it unchanged.

The held-out check (``OutputChecker``) and a user's task metric take a module and call it on tensors. An int8
model exists only as an ONNX file (onnxruntime's QDQ graph has no torch counterpart), so ``OnnxModule`` holds
the file's bytes and a CPU session and answers ``module(x)`` with the session's outputs as float tensors: one
tensor for a one-output graph, else a tuple in the graph's output order (the exporter's flattening order, the
order ``output_leaves`` reads a torch model's outputs in). A graph exported with a static batch runs the
inputs in chunks of that size, the last chunk zero-padded and its padding cut from the outputs.

It has no parameters and no gradients: ``save`` writes the bytes it runs (atomically) for deployment.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from ..files.atomic import check_writable, publish
from .sessions import make_session, run_checked, session_feeds

__all__ = ["OnnxModule"]


class OnnxModule(nn.Module):
    """``module(*inputs)`` runs ``path`` in onnxruntime (CPU).

    Args:
        path: an ``.onnx`` file; its bytes (external data included) are read now, so the file may be removed
            afterwards.
        threads: intra-op threads of the session (None: onnxruntime's default, every core).
        name: how errors name the model.
    Raises:
        InputSpecError: onnxruntime cannot load the file.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, name: str | None = None):
        super().__init__()
        path = Path(path)
        self.name = name or path.name
        self.onnx_bytes = onnx.load(str(path)).SerializeToString()
        self.session = make_session(path, threads=threads)
        first = self.session.get_inputs()[0].shape
        self.batch = first[0] if first and isinstance(first[0], int) and first[0] > 0 else None

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        arrays = [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in inputs]
        rows = len(arrays[0]) if arrays and arrays[0].ndim else 0
        if self.batch is None or rows == self.batch:
            outputs = self._run(arrays)
        else:
            chunks = []
            for start in range(0, rows, self.batch):
                part = [a[start:start + self.batch] for a in arrays]
                size = len(part[0])
                padded = [np.concatenate([a, np.zeros((self.batch - size, *a.shape[1:]), a.dtype)]) for a in part]
                chunks.append([out[:size] for out in self._run(padded)])
            outputs = [np.concatenate(parts) for parts in zip(*chunks)]
        tensors = tuple(torch.from_numpy(np.ascontiguousarray(out)).float() for out in outputs)
        return tensors[0] if len(tensors) == 1 else tensors

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return run_checked(self.session, session_feeds(self.session, arrays), self.name)

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Write the ONNX model this module runs to ``path`` atomically (an existing file only with ``force``).

        Raises:
            OutputExistsError: ``path`` exists and ``force`` is False.
        """
        path = check_writable(path, force)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as staging:
            staged = Path(staging) / path.name
            staged.write_bytes(self.onnx_bytes)
            publish(staged, path, force)
        return path

    def extra_repr(self) -> str:
        return f"{self.name!r}, batch={self.batch or 'any'}"

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(f"OnnxModule {self.name} holds an onnxruntime session and cannot be pickled; save() it")
