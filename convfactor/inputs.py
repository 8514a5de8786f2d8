"""Example inputs as the user gives them -> what a model or an onnxruntime session is fed.

One normalization for the whole package: a tensor, a numpy array, or a tuple/list of them becomes a
tuple of tensors (``as_input_tuple``); an input shape becomes a tuple of shapes (``input_shapes``);
either, for onnxruntime, a tuple of float arrays (``numpy_inputs``).

``Samples`` names what data arguments (``calibration``, ``validation``) accept: a tensor of samples,
one batch of a multi-input model as a tuple of tensors, or batches (a list, a DataLoader) each a
tensor or a tuple of tensors (extra items, e.g. the labels of ``(x, y)``, are ignored).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeAlias

import numpy as np
import torch

from .errors import InputSpecError

__all__ = ["Batch", "Samples", "as_input_tuple", "input_shapes", "standard_normal_inputs", "numpy_inputs"]

Batch: TypeAlias = torch.Tensor | Sequence[torch.Tensor]  # one tensor per model input (more are ignored)
Samples: TypeAlias = torch.Tensor | tuple[torch.Tensor, ...] | Iterable[Batch]


def as_input_tuple(example_inputs: Any, *, allow_none: bool = False) -> tuple[torch.Tensor, ...] | None:
    """Normalize example inputs (a tensor, an array, or a tuple/list of them) to a tuple of tensors.

    Args:
        example_inputs: what the user gave.
        allow_none: ``None`` means "no inputs" and is returned as is; otherwise it is an error.
    Raises:
        InputSpecError: an element is neither a tensor nor a numpy array, or nothing was given.
    """
    if example_inputs is None and allow_none:
        return None
    items = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not items:
        raise InputSpecError("no example inputs given")
    tensors = []
    for i, item in enumerate(items):
        if isinstance(item, np.ndarray):
            item = torch.from_numpy(np.ascontiguousarray(item))
        if not isinstance(item, torch.Tensor):
            raise InputSpecError(
                f"example input {i} is a {type(item).__name__}; give tensors or numpy arrays "
                "(a tuple of them for a model with several inputs)"
            )
        tensors.append(item)
    return tuple(tensors)


def input_shapes(input_shape: Sequence[int] | Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    """Normalize ``(1, 3, 224, 224)`` or ``[(1, 3, 224, 224), (1, 10)]`` to a tuple of shapes.

    Raises:
        InputSpecError: a dimension is not a positive int.
    """
    shapes = input_shape
    if len(shapes) == 0:
        raise InputSpecError("input_shape is empty")
    if all(isinstance(d, (int, np.integer)) for d in shapes):
        shapes = (shapes,)
    result = []
    for shape in shapes:
        if not isinstance(shape, (tuple, list)) or not shape or not all(
            isinstance(d, (int, np.integer)) and d > 0 for d in shape
        ):
            raise InputSpecError(f"input_shape {list(input_shape)!r}: give positive ints, e.g. (1, 3, 224, 224)")
        result.append(tuple(int(d) for d in shape))
    return tuple(result)


def standard_normal_inputs(shapes: Sequence[Sequence[int]], seed: int = 0) -> tuple[np.ndarray, ...]:
    """Float32 standard-normal arrays of the given shapes, reproducible from ``seed``."""
    from .input_checks import check_input_memory  # before allocating: one line, not MemoryError

    for shape in shapes:
        check_input_memory(shape, flag="input_shape")
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(tuple(shape), dtype=np.float32) for shape in shapes)


def numpy_inputs(example_inputs: Any, input_shape: Any, seed: int = 0) -> tuple[np.ndarray, ...]:
    """The example inputs as arrays or, without them, standard-normal arrays of ``input_shape``.

    Raises:
        InputSpecError: neither was given, or either is malformed.
    """
    if example_inputs is not None:
        return tuple(t.detach().cpu().numpy() for t in as_input_tuple(example_inputs))
    if input_shape is not None:
        return standard_normal_inputs(input_shapes(input_shape), seed=seed)
    raise InputSpecError("give example_inputs or input_shape, e.g. input_shape=(1, 3, 224, 224)")
