"""Reading checkpoints: everything between a file on disk and the weights of an ``nn.Module``.

Accepted inputs, with the one rule that keeps loading safe: **every read uses**
``torch.load(weights_only=True)``; only ``trust=True`` (CLI ``--trust-checkpoint``) unpickles Python objects.

* a state_dict, plain or nested under ``state_dict``/``model``/``model_state_dict``/``net``, with a
  ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile) prefix stripped, plus an architecture
  ``"package.module:factory"`` (importable from the current directory) or ``"path/to/file.py:factory"``;
* a whole pickled ``nn.Module`` (only with ``trust=True``);
* a ``torch.export`` program (``.pt2``): its ``module()`` has no Conv/Linear modules (parameters are
  read by ``aten.conv2d``/``aten.linear`` calls), so ``lift_exported_module`` turns those calls back into
  ``nn.Conv1d``/``nn.Conv2d``/``nn.Linear``/``nn.BatchNorm`` modules with the original names; the result
  traces with torch.fx, folds BatchNorm and factorizes like an eager model (``trace=False`` works too;
  see ``exported_program``);
* a factorized checkpoint written by ``convfactor.files.serialize`` (recognized here, rebuilt there).

The architecture a state_dict needs is resolved in ``architecture``.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from ..errors import CheckpointError, one_line
from .architecture import cwd_importable

__all__ = [
    "FACTORIZED_FORMAT",
    "STATE_DICT_KEYS",
    "Checkpoint",
    "read_checkpoint",
    "extract_state_dict",
    "load_weights",
    "check_finite",
    "check_readable",
    "torch_load_reason",
]

FACTORIZED_FORMAT = "convfactor/1"
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net")
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile
_MISMATCHES_SHOWN = 3


# -- the architecture ---------------------------------------------------------------------------


# -- reading files ------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """What a checkpoint file held.

    Attributes:
        path: the file.
        kind: ``"state_dict"``, ``"module"`` (a pickled nn.Module), ``"exported"`` (a .pt2 program) or
            ``"factorized"`` (written by ``convfactor.files.serialize``).
        content: the state_dict, the module, the ExportedProgram, or the factorized payload dict.
        notes: what was done to read it (nesting key, stripped prefix), for the report.
    """

    path: Path
    kind: str
    content: Any
    notes: list[str] = field(default_factory=list)


def check_readable(path: str | os.PathLike, what: str = "checkpoint") -> Path:
    """The path, after checking it is an existing, readable file (a one-line error otherwise)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a directory, not a file")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as bad:
        raise CheckpointError(f"cannot read {what} {path}: {bad.strerror or bad}") from None
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty")
    return path


def _is_exported_program(path: Path) -> bool:
    if path.suffix == ".pt2":
        return True
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("archive_format") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_checkpoint(path: str | os.PathLike, *, trust: bool = False) -> Checkpoint:
    """Read a checkpoint file safely and say what it holds.

    Args:
        path: a ``.pt``/``.pth``/``.pt2`` file.
        trust: allow unpickling arbitrary Python objects (a whole pickled model). Only for files you trust.
    Returns:
        The Checkpoint; a state_dict is already unnested and un-prefixed.
    Raises:
        CheckpointError: missing, unreadable, corrupt or truncated file; a pickle without ``trust``;
            content that is none of the accepted kinds.
    """
    path = check_readable(path)
    if _is_exported_program(path):
        return Checkpoint(path, "exported", _load_exported(path))
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as bad:
        message = str(bad)
        if "Weights only load failed" not in message and "weights_only" not in message:
            raise CheckpointError(f"cannot read checkpoint {path}: the file is corrupt or truncated "
                                  f"({one_line(bad)})") from None
        if not trust:
            found = re.search(r"GLOBAL ([\w.]+)", message)
            if found is None:  # not a reference to code: a damaged file, or bytes no torch.save wrote
                raise CheckpointError(
                    f"cannot read checkpoint {path}: the file is corrupt or truncated, or not written by "
                    f"torch.save ({torch_load_reason(bad)})"
                ) from None
            raise CheckpointError(
                f"{path} holds pickled Python objects (it references {found.group(1)}), not only weights; to load "
                f"a whole pickled model pass --trust-checkpoint, only if you trust the file (unpickling can run "
                f"arbitrary code)"
            ) from None
        content = _load_trusted(path)
    except Exception as bad:  # zip/pickle/EOF errors of a damaged file all land here
        raise CheckpointError(f"cannot read checkpoint {path}: the file is corrupt or truncated "
                              f"({type(bad).__name__}: {one_line(bad)})") from None
    if isinstance(content, nn.Module):
        return Checkpoint(path, "module", content, ["whole pickled module (read with --trust-checkpoint)"])
    if isinstance(content, Mapping) and content.get("format") == FACTORIZED_FORMAT:
        return Checkpoint(path, "factorized", dict(content))
    if isinstance(content, Mapping) and isinstance(content.get("format"), str) and \
            str(content["format"]).startswith("convfactor/"):
        raise CheckpointError(f"{path} is a convfactor checkpoint of format {content['format']!r}; this version "
                              f"reads {FACTORIZED_FORMAT!r} (upgrade convfactor)")
    state_dict, notes = extract_state_dict(content, path)
    return Checkpoint(path, "state_dict", state_dict, notes)


def _load_trusted(path: Path) -> Any:
    try:
        with cwd_importable():  # the pickled classes are looked up by module name
            return torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as missing:
        raise CheckpointError(f"cannot unpickle {path}: the class it was saved with is not importable here "
                              f"({one_line(missing)}); run from the directory of its code or use a "
                              f"state_dict with --arch") from None
    except Exception as bad:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is corrupt or truncated "
                              f"({type(bad).__name__}: {one_line(bad)})") from None


def _load_exported(path: Path) -> Any:
    import logging

    # torch.export.load logs a full traceback as a warning before raising; the user gets our one line.
    loggers = [logging.getLogger(name) for name in ("torch.export", "torch.export.pt2_archive._package")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR + 10)
    try:
        return torch.export.load(str(path))
    except Exception as bad:
        raise CheckpointError(f"cannot read exported program {path}: the file is corrupt, truncated or not a "
                              f"torch.export .pt2 archive ({type(bad).__name__}: {one_line(bad)})") from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def extract_state_dict(content: Any, path: str | os.PathLike = "checkpoint") -> tuple[dict[str, torch.Tensor], list]:
    """Find the state_dict in a loaded checkpoint and strip wrapper prefixes.

    Args:
        content: what ``torch.load`` returned.
        path: for messages.
    Returns:
        (state_dict, notes): names -> tensors, and what was done (``"nested under 'model'"``, ...).
    Raises:
        CheckpointError: no dict of tensors found.
    """
    notes = []
    if isinstance(content, Mapping) and not _is_tensor_dict(content):
        for key in STATE_DICT_KEYS:
            if isinstance(content.get(key), Mapping) and _is_tensor_dict(content[key]):
                content = content[key]
                notes.append(f"state_dict nested under {key!r}")
                break
    if not isinstance(content, Mapping) or not _is_tensor_dict(content):
        raise CheckpointError(f"{path} does not hold a state_dict: expected names -> tensors (possibly under "
                              f"{'/'.join(repr(k) for k in STATE_DICT_KEYS)}), found {_describe(content)}")
    state = {str(k): v for k, v in content.items()}
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
            notes.append(f"stripped the {prefix!r} prefix")
    return state, notes


def _is_tensor_dict(value: Mapping) -> bool:
    return bool(value) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        keys = list(value)[:4]
        return f"a dict with keys {', '.join(repr(k) for k in keys)}{' ...' if len(value) > 4 else ''}" \
            if keys else "an empty dict"
    return f"a {type(value).__name__}"


# -- weights ------------------------------------------------------------------------------------
def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, where: str = "checkpoint") -> None:
    """``model.load_state_dict(state_dict, strict=True)`` with a one-line list of the first mismatches.

    Raises:
        CheckpointError: missing or unexpected keys, or shape mismatches (the first few of each).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} {list(state_dict[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
              if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch (file vs model)", shapes)):
        if items:
            shown = ", ".join(items[:_MISMATCHES_SHOWN]) + (f" (+{len(items) - _MISMATCHES_SHOWN} more)"
                                                             if len(items) > _MISMATCHES_SHOWN else "")
            problems.append(f"{len(items)} {label}: {shown}")
    if problems:
        raise CheckpointError(f"the {where} does not fit the architecture: " + "; ".join(problems))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as bad:  # e.g. a dtype that cannot be copied
        raise CheckpointError(f"the {where} does not fit the architecture: {one_line(bad)}") from None


def check_finite(model: nn.Module, what: str = "model") -> None:
    """Raise if any floating-point parameter or buffer holds NaN or Inf (names the first few)."""
    bad = []
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            nans, infs = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            bad.append(f"{name} ({nans} NaN, {infs} Inf)")
    if bad:
        shown = ", ".join(bad[:_MISMATCHES_SHOWN]) + (f" (+{len(bad) - _MISMATCHES_SHOWN} more)"
                                                       if len(bad) > _MISMATCHES_SHOWN else "")
        raise CheckpointError(f"the {what} has non-finite weights: {shown}")


# -- torch.export programs ----------------------------------------------------------------------


# -- helpers ------------------------------------------------------------------------------------
def torch_load_reason(error: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in a few words: the unpickler's own reason without
    torch's advice to load with ``weights_only=False`` (which would run code from the file)."""
    text = str(error)
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.S)
    if found:
        reason = one_line(found.group(1), whole=True)
    else:
        reason = one_line(error, with_type=True)
    reason = re.sub(r"\s*Check the documentation of torch\.load.*$", "", reason).rstrip(" .")
    return reason or type(error).__name__

