"""ONNX files that store shared weights as codebook + uint8 indices, so the file really shrinks.

``pack_codebooks`` rewrites every float initializer that takes at most 256 distinct values (and has more
than twice as many elements as values) into a float codebook and a uint8 index tensor of its shape,
expanded at load time by ``Cast`` (uint8 -> int32) and ``Gather`` (codebook, indices): the graph computes
exactly the tensor it had. onnxruntime folds the expansion into a constant when it builds the session,
so inference runs the same kernels as before. A weight-shared model (``convfactor.share.share_weights``) is
exported with ``export_shared_onnx``: ``export_onnx`` then ``pack_codebooks`` on the file.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .files.atomic import atomic_write_bytes

__all__ = ["PackResult", "pack_codebooks", "export_shared_onnx"]

_MAX_CODEBOOK = 256
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)


@dataclass
class PackResult:
    """What ``pack_codebooks`` wrote: file sizes before and after, and the tensors packed."""

    path: Path
    size_before: int
    size_after: int
    packed: list[str]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


def pack_codebooks(source: str | os.PathLike, target: str | os.PathLike | None = None,
                   force: bool = False) -> PackResult:
    """Rewrite ``source`` with its few-valued initializers as codebook + uint8 indices (see module doc).

    Args:
        source: an ONNX file with its weights inside (no external data).
        target: where to write; None: replace ``source`` (always allowed).
        force: replace an existing ``target``.
    """
    source = Path(source)
    target = source if target is None else Path(target)
    model = onnx.load(str(source))
    graph = model.graph
    size_before = source.stat().st_size
    graph_inputs = {value.name for value in graph.input}
    kept, expansions, packed = [], [], []
    for tensor in graph.initializer:
        values = numpy_helper.to_array(tensor) if tensor.data_type in _FLOAT_TYPES else None
        codebook = None if values is None or values.size == 0 else np.unique(values)
        if codebook is None or len(codebook) > _MAX_CODEBOOK or values.size <= 2 * len(codebook) \
                or tensor.name in graph_inputs:
            kept.append(tensor)
            continue
        indices = np.searchsorted(codebook, values).astype(np.uint8)
        name = tensor.name
        kept.append(numpy_helper.from_array(codebook, f"{name}__codebook"))
        kept.append(numpy_helper.from_array(indices, f"{name}__indices"))
        expansions.append(helper.make_node("Cast", [f"{name}__indices"], [f"{name}__indices32"],
                                           to=onnx.TensorProto.INT32, name=f"{name}__cast"))
        expansions.append(helper.make_node("Gather", [f"{name}__codebook", f"{name}__indices32"], [name],
                                           axis=0, name=f"{name}__gather"))
        packed.append(name)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = expansions + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    atomic_write_bytes(target, data, force=force or target == source)
    return PackResult(target, size_before, len(data), packed)


def export_shared_onnx(model: Any, example_inputs: Any, path: str | os.PathLike, *, force: bool = False,
                       **export_options: Any) -> tuple[Any, PackResult]:
    """``export_onnx`` (same options) then ``pack_codebooks`` on the written file: (ExportResult, PackResult)."""
    from .runtime.export import export_onnx

    result = export_onnx(model, example_inputs, path, force=force, **export_options)
    return result, pack_codebooks(result.path)
