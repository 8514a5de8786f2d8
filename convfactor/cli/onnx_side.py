"""A side of ``convfactor bench`` given as an ``.onnx`` file (an int8 model from ``convert --quantize``, any export).

An ONNX file needs no architecture: it is timed as it is. What it cannot say is a dynamic input dimension's size,
so the timed shape comes from ``--input-shape``, else the other side's checkpoint, else the first file whose
input is fully static; every file's static dimensions must agree with it (checked before any timing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["OnnxSide", "is_onnx", "read_onnx_side", "onnx_bench_shape"]


@dataclass(frozen=True)
class OnnxSide:
    """An ONNX model to time: its file, its one input's dimensions (None where dynamic), whether it is int8."""

    path: Path
    input_name: str
    dims: tuple[int | None, ...]
    dim_names: tuple[str, ...]
    quantized: bool

    def describe(self) -> dict[str, Any]:
        return {"onnx": str(self.path), "kind": "onnx", "quantized": self.quantized, "input": self.input_name,
                "input_shape": list(self.dim_names)}


def is_onnx(path: str | None) -> bool:
    """Whether a command-line model path names an ONNX file (by its suffix)."""
    return path is not None and Path(path).suffix.lower() == ".onnx"


def read_onnx_side(path: str, what: str) -> OnnxSide:
    """The ONNX file at ``path``, checked: readable, an ONNX model, one input.

    Raises:
        ConvfactorError: none of those; one line naming ``what``.
    """
    import onnx

    from ..errors import ConvfactorError, one_line
    from ..files.checkpoint import check_readable
    from ..runtime.onnx_graph import value_shape
    from ..runtime.quantized_graph import quantized_nodes

    check_readable(path, what)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf raises anything on a file that is not ONNX
        raise ConvfactorError(f"{what} {path} is not an ONNX model: {one_line(error, with_type=True)}") from None
    initializers = {t.name for t in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise ConvfactorError(f"{what} {path} takes {len(inputs)} inputs; bench times one-input ONNX models")
    shape = value_shape(inputs[0])
    dims = tuple(d if isinstance(d, int) and d > 0 else None for d in shape)
    names = tuple(str(d) if isinstance(d, int) and d > 0 else str(d or "?") for d in shape)
    return OnnxSide(Path(path), inputs[0].name, dims, names, bool(quantized_nodes(model)))


def onnx_bench_shape(given: tuple[int, ...] | None, sides: Sequence[OnnxSide], flag: str = "--input-shape"
                     ) -> tuple[int, ...]:
    """The shape to time with: ``given`` (checked against every file), else the first fully static input.

    Raises:
        ConvfactorError: ``given`` does not fit a file's input, or no shape is known (a dynamic dimension
            and no ``given``).
    """
    from ..errors import ConvfactorError

    shape = given
    if shape is None:
        static = [side for side in sides if side.dims and all(d is not None for d in side.dims)]
        if not static:
            side = sides[0]
            raise ConvfactorError(f"{side.path} has a dynamic input shape [{', '.join(side.dim_names)}]: give "
                                  f"{flag} N,C,H,W (the batch to time)")
        shape = tuple(static[0].dims)
    for side in sides:
        fits = len(side.dims) == len(shape) and all(d is None or d == s for d, s in zip(side.dims, shape))
        if not fits:
            raise ConvfactorError(f"{flag} {','.join(map(str, shape))} does not fit {side.path}'s input "
                                  f"[{', '.join(side.dim_names)}]")
    return tuple(shape)
