"""Checks of what a user gave the command line, with messages naming it and what would work instead.

Each helper does one check and raises ``ConvfactorError`` (printed as one ``error:`` line, exit 2):
the ``--out`` file name, an inputs file (``--calibration``, ``--check-inputs``), thread and timing
counts, an output directory where no file can be created, and an input shape the model's first layer
cannot take.
"""

from __future__ import annotations

import argparse
import errno
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConvfactorError
from ..files.checkpoint import torch_load_reason
from .console import one_line

__all__ = ["OUT_SUFFIXES", "check_out_name", "load_inputs_file", "inputs_file_error", "parse_threads", "check_counts",
           "cannot_create_error", "example_input"]

OUT_SUFFIXES = (".pt", ".pth", ".pt2")
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def check_out_name(out: Path) -> None:
    """``--out`` must name a format convert writes: ``.pt``/``.pth`` (convfactor.load) or ``.pt2``.

    Raises:
        ConvfactorError: another suffix (``.onnx`` points to ``--onnx``).
    """
    suffix = out.suffix.lower()
    if suffix in OUT_SUFFIXES:
        return
    if suffix == ".onnx":
        raise ConvfactorError(f"--out {out}: --out writes the factorized model as .pt (for convfactor.load) or .pt2 "
                              f"(torch.export), not ONNX; for ONNX add --onnx {out} and give --out "
                              f"{out.with_suffix('.pt')}")
    raise ConvfactorError(f"--out {out}: the name must end in .pt or .pth (a factorized checkpoint for "
                          f"convfactor.load) or .pt2 (a torch.export program)")


def inputs_file_error(option: str, path: str | Path, error: BaseException) -> ConvfactorError:
    """The error for an inputs file (``--check-inputs``, ``--calibration``) that could not be read."""
    return ConvfactorError(f"{option}: cannot read {path}: not a tensor saved with torch.save (.pt) or numpy.save "
                           f"(.npy), or the file is corrupt or truncated ({torch_load_reason(error)})")


def load_inputs_file(path: str | None, option: str):
    """A tensor of inputs from a .pt (torch.save, read with weights_only=True) or .npy file, or None."""
    if path is None:
        return None
    import numpy as np

    file = Path(path)
    if not file.is_file():
        raise ConvfactorError(f"{option}: file not found: {path}")
    try:
        if file.suffix == ".npy":
            data = torch.from_numpy(np.load(file, allow_pickle=False))
        else:
            data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file: say which, in one line
        raise inputs_file_error(option, path, error) from None
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], torch.Tensor):
        data = data[0]  # an (inputs, labels) pair
    if not isinstance(data, torch.Tensor) or data.dim() < 2 or len(data) == 0:
        raise ConvfactorError(f"{option}: {path} must hold one tensor of inputs shaped (N, ...), "
                              f"got {type(data).__name__}")
    if not torch.isfinite(data).all():
        raise ConvfactorError(f"{option}: {path} contains NaN or Inf")
    return data.float()


def parse_threads(text: str | None) -> list[int] | None:
    """``--threads 1,4`` -> [1, 4]; None when not given."""
    if text is None:
        return None
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or any(c < 1 for c in counts):
        raise ConvfactorError(f"--threads must be positive integers separated by commas, got {text!r}")
    return counts


def check_counts(args: argparse.Namespace) -> None:
    """``--check-samples``, ``--warmup``, ``--repeats`` and ``--min-time`` are in range (where the command has them)."""
    if getattr(args, "check_samples", 1) < 1:
        raise ConvfactorError(f"--check-samples must be >= 1, got {args.check_samples}")
    if getattr(args, "warmup", 0) < 0 or getattr(args, "repeats", 1) < 1 or getattr(args, "min_time", 0) < 0:
        raise ConvfactorError("--warmup must be >= 0, --repeats >= 1 and --min-time >= 0")


def cannot_create_error(path: Path, error: OSError) -> ConvfactorError:
    """The error when no file can be created beside ``path``: unwritable, or refused for another reason."""
    reason = error.strerror or str(error)
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ConvfactorError(f"cannot write {path}: directory {path.parent} is not writable ({reason})")
    return ConvfactorError(f"cannot write {path}: cannot create a file in {path.parent} ({reason}); "
                           f"choose another directory")


class _Misfit(Exception):
    pass


def _first_layer_check(name: str, layer: nn.Module, shape: tuple[int, ...]) -> str | None:
    """Why ``layer`` cannot take an input of ``shape`` (batch first), or None."""
    if isinstance(layer, nn.Linear):
        if shape[-1] != layer.in_features:
            return (f"its first layer {name} (Linear) takes {layer.in_features} features in the last dimension, "
                    f"the shape gives {shape[-1]}")
        return None
    dims = len(layer.kernel_size)
    spatial = ("length",) if dims == 1 else ("height", "width") if dims == 2 else ("depth", "height", "width")
    if len(shape) != dims + 2:
        return (f"its first layer {name} ({type(layer).__name__}) takes {dims + 2} dimensions (batch, "
                f"{layer.in_channels} channels, {', '.join(spatial)}), the shape has {len(shape)}")
    if shape[1] != layer.in_channels:
        return (f"its first layer {name} ({type(layer).__name__}) takes {layer.in_channels} input channels, "
                f"the shape gives {shape[1]}")
    return None


def example_input(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """A zero tensor of ``shape`` on the model's dtype, after checking the model runs on it.

    When the first Conv/Linear layer the model calls receives the input as given and cannot take it, the
    message says so in terms of the shape the user gave (not the reshaped tensor PyTorch reports).

    Raises:
        ConvfactorError: the model cannot run on that shape.
    """
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    shape = tuple(shape)
    x = torch.zeros(shape, dtype=param.dtype if param is not None else torch.float32)
    text = ",".join(map(str, shape))
    names = {layer: name for name, layer in model.named_modules() if isinstance(layer, _LAYERS)}
    seen: list[bool] = []

    def hook(layer: nn.Module, args: tuple[Any, ...]) -> None:
        if seen:
            return
        seen.append(True)
        if args and isinstance(args[0], torch.Tensor) and tuple(args[0].shape) == tuple(x.shape):
            reason = _first_layer_check(names[layer], layer, tuple(x.shape))
            if reason:
                raise _Misfit(reason)

    handles = [layer.register_forward_pre_hook(hook) for layer in names]
    try:
        with torch.no_grad():
            model(x)
    except _Misfit as misfit:
        raise ConvfactorError(f"input shape {text} does not fit the model: {misfit}") from None
    except Exception as bad:  # the model's own error names the mismatch
        raise ConvfactorError(f"input shape {text} does not fit the model: "
                              f"{type(bad).__name__}: {one_line(str(bad))}") from None
    finally:
        for handle in handles:
            handle.remove()
    return x
