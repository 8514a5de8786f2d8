"""Inputs checked against the model before any expensive step: one code path for the API and the CLI.

Every tensor a user hands convfactor (example inputs, calibration, check inputs, held-out validation
data) is checked here, so a mistake costs one line and no work instead of a traceback after minutes:

- ``check_example_inputs``: the example runs through the model; the first Conv/Linear layer that cannot
  take it is named in the terms of what was given (shape, channels, dtype), not PyTorch's reshaped view.
- ``check_inputs``: a batch of samples (a tensor, a tuple of tensors, a list of batches, a DataLoader)
  against the model: sample count >= 1, rank, channels, dtype, finiteness; a spatial size other than the
  example's is allowed when the network runs on it (checked by running the model once on one sample)
  and reported in the result's ``note``.
- ``check_input_memory``: an input shape whose tensor alone would not fit in memory is refused before
  anything is allocated.

Every failure is an ``InputSpecError`` (a ``ConvfactorError``): one line naming the flag or argument,
the file when there is one, and what was expected.

Example (a held-out validation set, as the CLI's ``--validation`` would check it):
    >>> check_inputs(model, torch.load("val.pt"), argument="validation", flag="--validation",
    ...              path="val.pt", example_inputs=(torch.zeros(1, 3, 32, 32),)).samples
    500
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import InputSpecError, one_line

__all__ = ["InputsCheck", "check_inputs", "check_example_inputs", "check_input_memory", "memory_limit"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_MEMORY_SHARE = 4  # one input tensor may take at most 1/4 of the machine's memory (activations need the rest)


@dataclass(frozen=True)
class InputsCheck:
    """What ``check_inputs`` found: samples counted (None for a DataLoader), per-sample shapes, a note."""

    samples: int | None
    shapes: tuple[tuple[int, ...], ...]
    note: str | None = None  # e.g. another spatial size than the example's, which the network accepts


def _who(argument: str, flag: str | None, path: Any) -> str:
    return (flag or argument) + (f" {path}" if path is not None else "")


def _dims(shape: Sequence[int]) -> str:
    return ",".join(map(str, shape))


def memory_limit() -> int:
    """Bytes one input tensor may take: a quarter of physical memory (2**62 where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // _MEMORY_SHARE
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def check_input_memory(shape: Sequence[int], *, flag: str = "input_shape", element_size: int = 4) -> None:
    """Refuse a shape whose tensor alone would take over a quarter of memory, before allocating it.

    Raises:
        InputSpecError: names ``flag``, the shape, its size and the machine's memory.
    """
    need = math.prod(int(d) for d in shape) * element_size
    limit = memory_limit()
    if need > limit:
        raise InputSpecError(f"{flag} {_dims(shape)}: one input tensor would take {need / 1e9:.3g} GB "
                             f"(float32), more than a quarter of this machine's {limit * _MEMORY_SHARE / 1e9:.3g} "
                             f"GB of memory (the activations need the rest); give a smaller shape")


class _Misfit(Exception):
    pass


def _first_layer_misfit(name: str, layer: nn.Module, x: torch.Tensor) -> str | None:
    """Why ``layer``, the first Conv/Linear the model calls, cannot take ``x`` as given, or None."""
    shape = tuple(x.shape)
    if x.is_floating_point() != layer.weight.is_floating_point() or (
            x.is_floating_point() and x.dtype != layer.weight.dtype):
        return (f"its first layer {name} ({type(layer).__name__}) takes {str(layer.weight.dtype)[6:]} inputs, "
                f"got {str(x.dtype)[6:]}")
    if isinstance(layer, nn.Linear):
        if not shape or shape[-1] != layer.in_features:
            return (f"its first layer {name} (Linear) takes {layer.in_features} features in the last dimension, "
                    f"got {shape[-1] if shape else 'a scalar'}")
        return None
    dims = len(layer.kernel_size)
    spatial = ("length",) if dims == 1 else ("height", "width") if dims == 2 else ("depth", "height", "width")
    if len(shape) != dims + 2:
        return (f"its first layer {name} ({type(layer).__name__}) takes {dims + 2} dimensions (batch, "
                f"{layer.in_channels} channels, {', '.join(spatial)}), got {len(shape)}")
    if shape[1] != layer.in_channels:
        return (f"its first layer {name} ({type(layer).__name__}) takes {layer.in_channels} input channels, "
                f"got {shape[1]}")
    return None


def _run_once(model: nn.Module, inputs: tuple[torch.Tensor, ...], kwargs: Mapping[str, Any] | None = None) -> None:
    """Run ``model`` on ``inputs`` in eval mode (restored after: the caller's model is not changed).

    Raises:
        _Misfit: the first Conv/Linear layer receives an input as given and cannot take it.
        Exception: whatever the model raised.
    """
    names = {layer: name for name, layer in model.named_modules() if isinstance(layer, _LAYERS)}
    given = {id(t) for t in inputs}
    seen: list[bool] = []

    def hook(layer: nn.Module, args: tuple[Any, ...]) -> None:
        if seen:
            return
        seen.append(True)
        if args and isinstance(args[0], torch.Tensor) and id(args[0]) in given:
            reason = _first_layer_misfit(names[layer], layer, args[0])
            if reason:
                raise _Misfit(reason)

    modes = {module: module.training for module in model.modules()}
    handles = [layer.register_forward_pre_hook(hook) for layer in names]
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs, **(kwargs or {}))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training


def check_example_inputs(model: nn.Module, inputs: Sequence[torch.Tensor], *, argument: str = "example_inputs",
                         flag: str | None = None, kwargs: Mapping[str, Any] | None = None) -> None:
    """The model runs on ``inputs`` (once, in eval mode, modes restored); else one line saying why.

    ``kwargs`` are the non-tensor ``forward`` arguments the model is traced with (``concrete_args``).

    Raises:
        InputSpecError: naming ``flag`` (or ``argument``) and the shapes given.
    """
    shapes = " and ".join(_dims(t.shape) or "()" for t in inputs)
    try:
        _run_once(model, tuple(inputs), kwargs)
    except _Misfit as misfit:
        raise InputSpecError(f"{flag or argument} {shapes} does not fit the model: {misfit}") from None
    except Exception as bad:  # noqa: BLE001 - the model's own error names the mismatch
        raise InputSpecError(f"{flag or argument} {shapes} does not fit the model: "
                             f"{one_line(bad, whole=True, with_type=True)}") from None


def _batches(data: Any, n_inputs: int, who: str) -> tuple[list[tuple[Any, ...]], bool]:
    """(the batches to check, whether they are all the data) from what the user gave."""
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(np.ascontiguousarray(data))
    if isinstance(data, torch.Tensor):
        return [(data,)], True
    if isinstance(data, tuple) and len(data) == n_inputs and all(isinstance(t, torch.Tensor) for t in data):
        return [data], True
    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise InputSpecError(f"{who}: expected a tensor of inputs shaped (N, ...), a list of batches or a "
                             f"DataLoader, got {type(data).__name__}")
    if isinstance(data, (list, tuple)):
        if not data:
            raise InputSpecError(f"{who}: holds no batch; expected at least 1 sample")
        return [_batch(b, n_inputs) for b in data], True
    if iter(data) is data:  # a one-shot iterator: reading it here would leave nothing for the work
        return [], False
    first = next(iter(data), None)  # a DataLoader: its first batch stands for the rest
    if first is None:
        raise InputSpecError(f"{who}: yields no batch; expected at least 1 sample")
    return [_batch(first, n_inputs)], False


def _batch(batch: Any, n_inputs: int) -> tuple[Any, ...]:
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(np.ascontiguousarray(batch))
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (list, tuple)):
        return tuple(batch)[:n_inputs]  # an (inputs, labels) pair keeps its inputs
    return (batch,)


def _check_tensor(t: Any, expected: torch.Tensor | None, who: str) -> None:
    """Static checks of one batch tensor against the example tensor it stands beside."""
    want = f"(N,{_dims(expected.shape[1:])})" if expected is not None else "(N, ...)"
    if not isinstance(t, torch.Tensor):
        raise InputSpecError(f"{who}: holds a {type(t).__name__}; expected tensors shaped {want}")
    if t.dim() == 0:
        raise InputSpecError(f"{who}: holds a scalar; expected a tensor shaped {want}")
    if len(t) == 0:
        raise InputSpecError(f"{who}: holds 0 samples (shape {_dims(t.shape)}); expected at least 1, shaped {want}")
    if t.dtype == torch.bool or t.is_complex():
        raise InputSpecError(f"{who}: holds {str(t.dtype)[6:]} values; expected real numbers shaped {want}")
    if expected is not None and expected.is_floating_point() and not t.is_floating_point():
        raise InputSpecError(f"{who}: holds {str(t.dtype)[6:]} values; the model takes floating-point inputs "
                             f"({str(expected.dtype)[6:]}): convert and normalize them as for training")
    if expected is not None and not expected.is_floating_point() and t.is_floating_point():
        raise InputSpecError(f"{who}: holds {str(t.dtype)[6:]} values; the model takes {str(expected.dtype)[6:]} "
                             f"inputs (indices or counts, as the example inputs)")
    if t.is_floating_point():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise InputSpecError(f"{who}: contains NaN or Inf ({bad} of {t.numel()} values); expected finite inputs")
    if expected is None:
        return
    if t.dim() != expected.dim():
        hint = " (one sample without its batch axis? add one with x.unsqueeze(0))" if t.dim() == expected.dim() - 1 \
            else ""
        raise InputSpecError(f"{who}: holds a tensor shaped {_dims(t.shape)}, {t.dim()} dimensions; expected "
                             f"{expected.dim()}, shaped {want}{hint}")
    if expected.dim() >= 2 and t.shape[1] != expected.shape[1]:
        hint = " (channels last? permute it to channels first)" if t.shape[-1] == expected.shape[1] else ""
        raise InputSpecError(f"{who}: holds {t.shape[1]} channels in dimension 1 (shape {_dims(t.shape)}); "
                             f"expected {expected.shape[1]}, shaped {want}{hint}")


def check_inputs(model: nn.Module, data: Any, *, argument: str, flag: str | None = None, path: Any = None,
                 example_inputs: Sequence[torch.Tensor] | None = None,
                 example_name: str = "the example inputs", kwargs: Mapping[str, Any] | None = None) -> InputsCheck:
    """Check samples for ``model`` before any work uses them: calibration, check or validation inputs.

    Args:
        model: the original model (run once on one sample when the sizes differ from the example's or
            there is no example; eval mode for that run, every module's mode restored after).
        data: a tensor or array (N, ...), a tuple of tensors (one batch of a multi-input model), a list of
            batches, or a DataLoader (its first batch is checked; a one-shot iterator is not read).
        argument: the API argument's name (``"calibration"``), used in messages without ``flag``.
        flag: the CLI option (``"--calibration"``) messages name instead.
        path: the file the data came from, named in messages.
        example_inputs: what the model is traced with: rank, channels and dtype must match it; other
            trailing sizes are allowed when the network runs on them (the note says so).
        example_name: how the note names the example (the CLI: ``"--input-shape"``).
        kwargs: non-tensor ``forward`` arguments for that run (``concrete_args``).
    Returns:
        ``InputsCheck``: samples (None when not all the data was seen), per-sample shapes, a note.
    Raises:
        InputSpecError: one line naming the flag or argument, the file and what was expected.
    """
    who = _who(argument, flag, path)
    examples = tuple(example_inputs) if example_inputs is not None else None
    n_inputs = len(examples) if examples else 1
    batches, complete = _batches(data, n_inputs, who)
    if not batches:
        return InputsCheck(None, (), f"{who}: a one-shot iterator, not checked before use")
    for batch in batches:
        if len(batch) != n_inputs:
            raise InputSpecError(f"{who}: a batch holds {len(batch)} tensor(s); the model takes {n_inputs}")
        for i, t in enumerate(batch):
            _check_tensor(t, examples[i] if examples else None, who)
    first = batches[0]
    shapes = tuple(tuple(t.shape[1:]) for t in first)
    samples = sum(len(b[0]) for b in batches) if complete else None
    differs = examples is None or any(tuple(t.shape[1:]) != tuple(e.shape[1:])
                                      for batch in batches for t, e in zip(batch, examples))
    if not differs:
        return InputsCheck(samples, shapes)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    likes = examples or tuple(param if param is not None else t for t in first)
    for batch in {tuple(tuple(t.shape[1:]) for t in b): b for b in batches}.values():  # each distinct size once
        one = tuple(t[:1].to(e.dtype) if t.is_floating_point() and e.is_floating_point() else t[:1]
                    for t, e in zip(batch, likes))
        try:
            _run_once(model, one, kwargs)
        except _Misfit as misfit:
            raise InputSpecError(f"{who}: samples shaped {' and '.join(_dims(t.shape[1:]) for t in batch)} do "
                                 f"not fit the model: {misfit}") from None
        except Exception as bad:  # noqa: BLE001 - the model's own error says what it wanted
            raise InputSpecError(f"{who}: the model cannot run on samples shaped "
                                 f"{' and '.join(_dims(t.shape[1:]) for t in batch)}: "
                                 f"{one_line(bad, whole=True, with_type=True)}") from None
    note = None
    if examples is not None:
        note = (f"{who}: samples shaped {' and '.join(_dims(s) for s in shapes)} where {example_name} gives "
                f"{' and '.join(_dims(e.shape[1:]) for e in examples)}; the network runs on them (checked on one "
                f"sample)")
    return InputsCheck(samples, shapes, note)
