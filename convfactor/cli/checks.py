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
from ..input_checks import check_example_inputs, check_input_memory, check_inputs

__all__ = ["OUT_SUFFIXES", "check_out_name", "load_inputs_file", "checked_inputs", "check_onnx_name",
           "inputs_file_error", "parse_threads", "check_counts", "cannot_create_error", "example_input"]

OUT_SUFFIXES = (".pt", ".pth", ".pt2")


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


def check_onnx_name(path: Path | None) -> None:
    """``--onnx`` must end in ``.onnx``: another suffix is most often a slip (``--onnx out.pt``) that would
    write ONNX under a name other tools read as something else.

    Raises:
        ConvfactorError: another suffix, naming the file and the fix.
    """
    if path is not None and path.suffix.lower() != ".onnx":
        raise ConvfactorError(f"--onnx {path}: the name must end in .onnx (the file is an ONNX model), e.g. "
                              f"--onnx {path.with_suffix('.onnx')}")


def inputs_file_error(option: str, path: str | Path, error: BaseException) -> ConvfactorError:
    """The error for an inputs file (``--check-inputs``, ``--calibration``) that could not be read."""
    return ConvfactorError(f"{option}: cannot read {path}: not a tensor saved with torch.save (.pt) or numpy.save "
                           f"(.npy), or the file is corrupt or truncated ({torch_load_reason(error)})")


def load_inputs_file(path: str | None, option: str):
    """What a .pt (torch.save, read with weights_only=True) or .npy file holds (an (inputs, labels) pair:
    its inputs), or None; ``checked_inputs`` checks it against the model."""
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
    return data


def checked_inputs(model: nn.Module, data: Any, flag: str, path: str, example: torch.Tensor | None,
                   console: Any) -> torch.Tensor | None:
    """An inputs file's tensor checked against the model (``convfactor.input_checks``, as the API checks it),
    in the example's dtype; a spatial size other than ``--input-shape``'s that the network runs on is
    reported on the console. None stays None.

    Raises:
        ConvfactorError: one line naming ``flag``, the file and what was expected.
    """
    if data is None:
        return None
    if not isinstance(data, torch.Tensor):
        raise ConvfactorError(f"{flag} {path}: must hold one tensor of inputs shaped (N, ...), "
                              f"got {type(data).__name__}")
    found = check_inputs(model, data, argument=flag, flag=flag, path=path,
                         example_inputs=None if example is None else (example,), example_name="--input-shape")
    if found.note:
        console.status(f"note: {found.note}")
    return data.to(example.dtype if example is not None else torch.float32)


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


def example_input(model: nn.Module, shape: tuple[int, ...], *, flag: str = "--input-shape") -> torch.Tensor:
    """A zero tensor of ``shape`` on the model's dtype, after checking it fits in memory and the model runs on it.

    The checks are ``convfactor.input_checks``' (the API's too): the size before allocating, then one
    run whose first Conv/Linear layer, when it cannot take the input as given, is named in terms of
    the shape the user typed (not the reshaped tensor PyTorch reports).

    Raises:
        ConvfactorError: the shape does not fit in memory or the model cannot run on it.
    """
    check_input_memory(shape, flag=flag)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    x = torch.zeros(tuple(shape), dtype=param.dtype if param is not None else torch.float32)
    check_example_inputs(model, (x,), flag=flag)
    return x
