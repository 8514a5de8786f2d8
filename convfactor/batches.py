"""The user's calibration data as input batches, and the floating-point tensors of a model's output.

``calibration_batches`` accepts what ``factorize(calibration=...)`` documents (a tensor, a tuple of
tensors, a list of batches, a DataLoader) and returns a list of input tuples bounded in samples and bytes,
so every consumer (statistics, held-out checks, distillation, weight sharing) reads the data one way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .errors import ConvfactorError

__all__ = ["DEFAULT_MAX_SAMPLES", "calibration_batches", "output_leaves"]

DEFAULT_MAX_SAMPLES = 512
_SPLIT_BATCH = 64
_SPLIT_BYTES = 8 << 20


def calibration_batches(
    calibration: Any,
    n_inputs: int = 1,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    like: Sequence[torch.Tensor] | None = None,
) -> list[tuple[torch.Tensor, ...]]:
    """The calibration data as a list of input tuples, at most ``max_samples`` samples in all.

    Args:
        calibration: a tensor (split into batches of at most 64 samples and about 8 MB), a tuple of
            tensors (one batch of a multi-input model), or an iterable of batches (a list, a DataLoader);
            a batch that is a list/tuple holding more than the model's inputs (``(x, y)``) keeps its first ``n_inputs``.
        n_inputs: how many tensors the model takes.
        max_samples: stop after this many samples (the last batch is cut).
        like: example inputs whose dtype and device floating-point batches are cast to.
    Raises:
        ConvfactorError: nothing usable was given.
    """
    if isinstance(calibration, torch.Tensor):
        # Batches of at most _SPLIT_BATCH samples and about _SPLIT_BYTES of input: the activations of a
        # forward pass grow with both (64 ImageNet-size images would hold over 1 GB of activations).
        sample_bytes = max(1, calibration[:1].numel() * calibration.element_size())
        size = max(1, min(_SPLIT_BATCH, _SPLIT_BYTES // sample_bytes))
        source: Iterable[Any] = calibration[:max_samples].split(size)
    elif isinstance(calibration, tuple) and all(isinstance(t, torch.Tensor) for t in calibration) \
            and len(calibration) == n_inputs:
        source = [calibration]
    elif isinstance(calibration, (str, bytes, Mapping)) or not isinstance(calibration, Iterable):
        raise ConvfactorError(f"calibration must be a tensor, a list of batches or a DataLoader, "
                              f"not {type(calibration).__name__}")
    else:
        source = calibration
    batches: list[tuple[torch.Tensor, ...]] = []
    count = 0
    for batch in source:
        tensors = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)[:n_inputs]
        if len(tensors) != n_inputs or not all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in tensors):
            raise ConvfactorError(f"each calibration batch must hold the model's {n_inputs} input tensor(s) "
                                  f"with a batch axis")
        take = min(len(tensors[0]), max_samples - count)
        tensors = tuple(t[:take] for t in tensors)
        if like is not None:
            tensors = tuple(t.to(device=e.device, dtype=e.dtype) if t.is_floating_point() else t.to(e.device)
                            for t, e in zip(tensors, like))
        batches.append(tensors)
        count += take
        if count >= max_samples:
            break
    if not batches or count == 0:
        raise ConvfactorError("calibration data is empty")
    return batches


def output_leaves(output: Any, detach: bool = True) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (any nesting) in pytree order, detached unless a loss
    needs their gradients (``detach=False``)."""
    leaves = [t for t in torch.utils._pytree.tree_leaves(output)
              if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return [t.detach() for t in leaves] if detach else leaves
