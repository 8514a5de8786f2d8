"""Reading checkpoints and resolving ``--arch``: everything between a file on disk and an ``nn.Module``.

Accepted inputs, with the one rule that keeps loading safe: **every read uses**
``torch.load(weights_only=True)``; only ``trust=True`` (CLI ``--trust-checkpoint``) unpickles Python objects.

* a state_dict, plain or nested under ``state_dict``/``model``/``model_state_dict``/``net``, with a
  ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile) prefix stripped, plus an architecture
  ``"package.module:factory"`` (importable from the current directory) or ``"path/to/file.py:factory"``;
* a whole pickled ``nn.Module`` (only with ``trust=True``);
* a ``torch.export`` program (``.pt2``): its ``module()`` has no Conv/Linear modules (parameters are
  read by ``aten.conv2d``/``aten.linear`` calls), so ``lift_exported_module`` turns those calls back into
  ``nn.Conv1d``/``nn.Conv2d``/``nn.Linear``/``nn.BatchNorm`` modules with the original names; the result
  traces with torch.fx, folds BatchNorm and factorizes like an eager model (``trace=False`` works too).
  Left as functional calls, hence not factorized: a weight read at several call sites (shared), or owned
  by a module that holds other tensors. The program's input guards are dropped, so other batch sizes
  run wherever the graph allows (a program exported with static shapes may still pin them in reshapes);
* a factorized checkpoint written by ``convfactor.serialize`` (recognized here, rebuilt there).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import operator
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from .errors import CheckpointError, ConvfactorError

__all__ = [
    "FACTORIZED_FORMAT",
    "STATE_DICT_KEYS",
    "Architecture",
    "Checkpoint",
    "resolve_arch",
    "stored_architecture",
    "builtin_factories",
    "parse_arch_kwargs",
    "read_checkpoint",
    "extract_state_dict",
    "load_weights",
    "check_finite",
    "check_readable",
    "lift_exported_module",
    "parse_input_shape",
    "torch_load_reason",
]

FACTORIZED_FORMAT = "convfactor/1"
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net")
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile
_MISMATCHES_SHOWN = 3


# -- the architecture ---------------------------------------------------------------------------
@dataclass
class Architecture:
    """A resolved ``--arch``: how to build the model again, and its default input shape if it says.

    Attributes:
        factory: the spec as it can be stored: ``"package.module:function"``, or for a file
            ``"/absolute/path/file.py:function"``.
        kwargs: keyword arguments for the factory (plain JSON values).
        build_fn: the imported callable.
        input_shape: default input shape (batch first) when the architecture exposes one: a zoo model,
            an ``input_shape`` attribute on the factory or on the model it returns.
    """

    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    build_fn: Callable[..., Any] | None = None
    input_shape: tuple[int, ...] | None = None

    def build(self) -> nn.Module:
        """Call the factory with its kwargs; a non-module result or a failing call is a user error."""
        try:
            model = self.build_fn(**self.kwargs)
        except TypeError as bad:  # wrong keyword arguments, most often
            raise ConvfactorError(f"--arch {self.factory}: calling it with {self.kwargs or 'no arguments'} "
                                  f"failed: {_first_line(bad)}") from None
        except Exception as bad:  # the user's code failed: say where, keep it to one line
            raise ConvfactorError(f"--arch {self.factory} raised {type(bad).__name__}: {_first_line(bad)}") from None
        if not isinstance(model, nn.Module):
            raise ConvfactorError(f"--arch {self.factory} returned {type(model).__name__}, not a torch.nn.Module")
        if self.input_shape is None:
            self.input_shape = _shape_or_none(getattr(model, "input_shape", None))
        return model

    def to_dict(self) -> dict[str, Any]:
        return {"factory": self.factory, "kwargs": dict(self.kwargs)}


def parse_arch_kwargs(text: str | Mapping | None) -> dict[str, Any]:
    """``--arch-args`` JSON text (or an already parsed dict) -> a kwargs dict.

    Raises:
        ConvfactorError: not valid JSON, or not a JSON object.
    """
    if text is None or text == "":
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as bad:
        raise ConvfactorError(f"--arch-args is not valid JSON ({bad.msg} at column {bad.colno}): {text!r}") from None
    if not isinstance(value, dict):
        raise ConvfactorError(f"--arch-args must be a JSON object of keyword arguments, got {text!r}")
    return value


def resolve_arch(spec: str, kwargs: Mapping[str, Any] | None = None) -> Architecture:
    """Import the factory named by ``spec`` (``"pkg.module:fn"`` or ``"path/file.py:fn"``).

    Only for a spec the user gave (``--arch``, ``arch=``) or a file the user trusts: importing runs code.
    While the module is imported (and only then) the current directory is on ``sys.path``, so a model
    file next to the checkpoint imports as it does in the user's own scripts.

    Args:
        spec: ``MODULE:FACTORY``; the module part may be a dotted name or a path to a ``.py`` file.
        kwargs: keyword arguments the factory will be called with.
    Returns:
        The Architecture (call ``.build()`` for the model).
    Raises:
        ConvfactorError: malformed spec, module not importable, no such callable.
    """
    module_part, sep, attribute = spec.rpartition(":")
    if not sep or not module_part or not attribute or not attribute.isidentifier():
        raise ConvfactorError(f"--arch must look like 'package.module:factory' or 'path/to/file.py:factory', "
                              f"got {spec!r}")
    if module_part.endswith(".py") or os.sep in module_part or "/" in module_part:
        path = Path(module_part).expanduser().resolve()
        with _cwd_importable():
            module = _import_file(path, spec)
        factory = f"{path}:{attribute}"
    else:
        with _cwd_importable():
            module = _import_module(module_part, spec)
        factory = spec
    build_fn = getattr(module, attribute, None)
    if build_fn is None:
        raise ConvfactorError(f"--arch {spec}: module {module_part!r} has no attribute {attribute!r}")
    if not callable(build_fn):
        raise ConvfactorError(f"--arch {spec}: {attribute!r} is a {type(build_fn).__name__}, not a callable")
    kwargs = dict(kwargs or {})
    return Architecture(factory, kwargs, build_fn, _declared_input_shape(factory, build_fn, kwargs))


def builtin_factories() -> set[str]:
    """The factories of convfactor's own zoo: code shipped with convfactor, safe for any file to name."""
    from .zoo import MODELS

    return {spec.factory for spec in MODELS.values()}


def stored_architecture(record: Mapping[str, Any], *, trusted: bool, where: str,
                        kwargs: Mapping[str, Any] | None = None) -> Architecture:
    """The architecture a file names (``{"factory": ..., "kwargs": ...}``), resolved only if that is safe.

    A file never selects code to run: its factory is imported only when it is one of convfactor's own
    zoo factories or the caller trusts the file (``trust_code=True``, CLI ``--trust-checkpoint``).

    Args:
        record: the stored ``arch`` record.
        trusted: the caller trusts the file to name code.
        where: the file, for the message.
        kwargs: keyword arguments overriding the stored ones.
    Raises:
        CheckpointError: the file names a factory the caller did not trust (nothing was imported).
    """
    factory = str(record.get("factory"))
    kwargs = dict(record.get("kwargs") or {}) if kwargs is None else dict(kwargs)
    if not trusted and factory not in builtin_factories():
        stored = record.get("kwargs") or {}
        called = f" with {json.dumps(stored)}" if stored else ""
        raise CheckpointError(
            f"{where} names the architecture factory {factory!r}{called}; a file does not choose code for "
            f"convfactor to run: pass your architecture (arch=..., CLI: --arch MODULE:FACTORY), or "
            f"trust_code=True (CLI: --trust-checkpoint) if you trust this file")
    return resolve_arch(factory, kwargs)


def _import_module(name: str, spec: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as missing:
        if missing.name and (name == missing.name or name.startswith(missing.name + ".")):
            raise ConvfactorError(f"--arch {spec}: no module named {name!r} (looked in the current directory "
                                  f"and the installed packages)") from None
        raise ConvfactorError(f"--arch {spec}: importing {name!r} failed: {_first_line(missing)}") from None
    except Exception as bad:  # a syntax error or a failing import inside the user's module
        raise ConvfactorError(f"--arch {spec}: importing {name!r} failed with {type(bad).__name__}: "
                              f"{_first_line(bad)}") from None


def _import_file(path: Path, spec: str) -> Any:
    if not path.is_file():
        raise ConvfactorError(f"--arch {spec}: file {path} not found")
    # A name derived from the full path: two files called model.py in different folders stay apart.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", path.stem)
    module_name = f"convfactor_arch_{stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConvfactorError(f"--arch {spec}: {path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    sys.path.insert(0, str(path.parent))  # so the file can import its neighbours
    try:
        module_spec.loader.exec_module(module)
    except Exception as bad:
        del sys.modules[module_name]
        raise ConvfactorError(f"--arch {spec}: importing {path.name} failed with {type(bad).__name__}: "
                              f"{_first_line(bad)}") from None
    finally:
        sys.path.remove(str(path.parent))
    return module


def _declared_input_shape(factory: str, build_fn: Any, kwargs: Mapping[str, Any]) -> tuple[int, ...] | None:
    """A zoo model's input shape (with ``in_channels`` applied), or the factory's ``input_shape`` attribute."""
    declared = _shape_or_none(getattr(build_fn, "input_shape", None))
    if declared is not None:
        return declared
    try:
        from .zoo import MODELS
    except ImportError:  # the zoo is optional for the CLI
        return None
    for spec in MODELS.values():
        if spec.factory == factory:
            shape = list(spec.input_shape)
            if isinstance(kwargs.get("in_channels"), int) and len(shape) > 1:
                shape[1] = kwargs["in_channels"]
            return tuple(shape)
    return None


def _shape_or_none(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, (tuple, list, torch.Size)) and value and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
    ):
        return tuple(value)
    return None


def parse_input_shape(text: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``; None stays None. Only commas separate: ``1x3x224x224``
    is refused with the comma form it may mean, never read silently.

    Raises:
        ConvfactorError: not a list of positive integers.
    """
    if text is None:
        return None
    if not isinstance(text, str):
        shape = _shape_or_none(list(text))
        if shape is None:
            raise ConvfactorError(f"input shape must be positive integers, got {text!r}")
        return shape
    compact = re.sub(r"\s+", "", text).strip("()[]")
    if re.fullmatch(r"\d+(?:[xX*]\d+)+", compact):
        raise ConvfactorError(f"--input-shape must be positive integers separated by commas, like 1,3,224,224; "
                              f"got {text!r} (did you mean {re.sub(r'[xX*]', ',', compact)}?)")
    shape = tuple(int(p) for p in compact.split(",")) if re.fullmatch(r"\d+(?:,\d+)*", compact) else ()
    if not shape or any(s <= 0 for s in shape):
        raise ConvfactorError(f"--input-shape must be positive integers separated by commas, "
                              f"like 1,3,224,224; got {text!r}")
    return shape


# -- reading files ------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """What a checkpoint file held.

    Attributes:
        path: the file.
        kind: ``"state_dict"``, ``"module"`` (a pickled nn.Module), ``"exported"`` (a .pt2 program) or
            ``"factorized"`` (written by ``convfactor.serialize``).
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
                                  f"({_first_line(bad)})") from None
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
                              f"({type(bad).__name__}: {_first_line(bad)})") from None
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


@contextlib.contextmanager
def _cwd_importable() -> Iterator[None]:
    """The current directory on ``sys.path`` for one import the user asked for, and removed after.

    A console script does not put the current directory on ``sys.path``, while ``python script.py``
    users expect their model files to import; it is never left there for the rest of the process.
    """
    cwd = os.getcwd()
    if cwd in sys.path:
        yield
        return
    sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if cwd in sys.path:
            sys.path.remove(cwd)


def _load_trusted(path: Path) -> Any:
    try:
        with _cwd_importable():  # the pickled classes are looked up by module name
            return torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as missing:
        raise CheckpointError(f"cannot unpickle {path}: the class it was saved with is not importable here "
                              f"({_first_line(missing)}); run from the directory of its code or use a "
                              f"state_dict with --arch") from None
    except Exception as bad:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is corrupt or truncated "
                              f"({type(bad).__name__}: {_first_line(bad)})") from None


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
                              f"torch.export .pt2 archive ({type(bad).__name__}: {_first_line(bad)})") from None
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
        raise CheckpointError(f"the {where} does not fit the architecture: {_first_line(bad)}") from None


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
_ATEN = torch.ops.aten
_CONV_TARGETS = {
    _ATEN.conv1d.default: 1, _ATEN.conv2d.default: 2,
    _ATEN.conv1d.padding: 1, _ATEN.conv2d.padding: 2,
}


def lift_exported_module(program: Any) -> torch.fx.GraphModule:
    """An eager-style GraphModule from a torch.export program: aten layer calls become layer modules.

    ``ExportedProgram.module()`` reads every parameter with ``get_attr`` and calls
    ``aten.conv2d(x, weight, bias, stride, padding, dilation, groups)``; convfactor works on
    ``nn.Conv2d`` modules. Each such call whose weight (and bias) are owned by a module holding nothing
    else becomes a ``call_module`` of a real ``nn.Conv1d``/``nn.Conv2d``/``nn.Linear`` at the owner's
    name (``layer1.0.conv1``), sharing the same tensors; eval-mode ``aten.batch_norm`` likewise becomes
    ``nn.BatchNorm1d/2d`` so it can be folded. State_dict keys stay those of the original model.

    Args:
        program: an ``ExportedProgram`` (or the GraphModule its ``module()`` returns).
    Returns:
        The GraphModule, numerically identical to the program.
    """
    graph_module = program.module() if hasattr(program, "module") and not isinstance(program, nn.Module) \
        else program
    graph = graph_module.graph
    for node in list(graph.nodes):
        # The input guards pin the exported example shapes (batch 1, say); dropping them lets the
        # lifted model run other batch sizes wherever the graph itself allows it.
        if node.op == "call_module" and str(node.target) == "_guards_fn" and not node.users:
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _CONV_TARGETS or node.target is _ATEN.linear.default:
            _lift_layer(graph_module, node)
        elif node.target is _ATEN.batch_norm.default:
            _lift_batchnorm(graph_module, node)
    graph.eliminate_dead_code()
    if _plain_calling_convention(graph):
        # A fresh GraphModule without the pytree in/out specs: it deep-copies and re-traces quietly.
        graph_module = torch.fx.GraphModule(graph_module, graph, type(graph_module).__name__)
    graph.lint()
    graph_module.recompile()
    return graph_module


def _plain_calling_convention(graph: torch.fx.Graph) -> bool:
    """Switch an exported graph to plain ``forward(*tensors) -> tensor(s)`` code when its specs allow it."""
    pytree_info = getattr(graph._codegen, "pytree_info", None)
    if pytree_info is None:
        return False
    in_spec, out_spec = pytree_info.in_spec, pytree_info.out_spec
    positional_only = (in_spec is not None and in_spec.type is tuple and in_spec.num_children == 2
                       and in_spec.child(0).type is tuple and all(c.is_leaf() for c in in_spec.child(0).children())
                       and in_spec.child(1).type is dict and in_spec.child(1).num_children == 0)
    if not positional_only or out_spec is None:
        return False
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    results = output.args[0]
    if out_spec.is_leaf() and isinstance(results, (tuple, list)) and len(results) == 1:
        output.args = (results[0],)
    elif not (out_spec.type is tuple and all(c.is_leaf() for c in out_spec.children())):
        return False
    graph._codegen = torch.fx.graph.CodeGen()
    return True


_CONV_DEFAULTS = (("bias", None), ("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))
_BN_ARGS = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")


def _call_args(node: torch.fx.Node, names: Sequence[str], defaults: Mapping[str, Any]) -> dict[str, Any]:
    values = dict(defaults)
    values.update(zip(names, node.args))
    values.update({k: v for k, v in node.kwargs.items() if k in names})
    return values


def _owner(graph_module: torch.fx.GraphModule, node: Any, attribute: str) -> str | None:
    """The owning module's name when ``node`` is ``get_attr owner.attribute`` used by one call only."""
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr" or len(node.users) != 1:
        return None
    owner, _, name = str(node.target).rpartition(".")
    return owner if name == attribute and owner else None


def _owned_tensors(graph_module: torch.fx.GraphModule, owner: str) -> tuple[set, set, bool]:
    module = graph_module.get_submodule(owner)
    params = {n for n, _ in module.named_parameters(recurse=False)}
    buffers = {n for n, _ in module.named_buffers(recurse=False)}
    return params, buffers, any(True for _ in module.children())


def _replace_with_module(graph_module: torch.fx.GraphModule, node: torch.fx.Node, owner: str,
                         module: nn.Module, input_node: Any) -> None:
    parent, _, name = owner.rpartition(".")
    setattr(graph_module.get_submodule(parent) if parent else graph_module, name, module)
    with graph_module.graph.inserting_before(node):
        call = graph_module.graph.call_module(owner, (input_node,))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    graph_module.graph.erase_node(node)


def _lift_layer(graph_module: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    linear = node.target is _ATEN.linear.default
    names = ("input", "weight", "bias") if linear else ("input", "weight") + tuple(n for n, _ in _CONV_DEFAULTS)
    args = _call_args(node, names, dict(_CONV_DEFAULTS))
    owner = _owner(graph_module, args["weight"], "weight")
    if owner is None:
        return
    if args["bias"] is not None and _owner(graph_module, args["bias"], "bias") != owner:
        return
    params, buffers, has_children = _owned_tensors(graph_module, owner)
    if has_children or buffers or params != ({"weight", "bias"} if args["bias"] is not None else {"weight"}):
        return  # the owner is more than a plain layer: leave the functional call as it is
    weight = operator.attrgetter(str(args["weight"].target))(graph_module)
    bias = None if args["bias"] is None else operator.attrgetter(str(args["bias"].target))(graph_module)
    if linear:
        if weight.dim() != 2:
            return
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    else:
        dims = _CONV_TARGETS[node.target]
        if weight.dim() != dims + 2:
            return
        groups = int(args["groups"])
        padding = args["padding"] if isinstance(args["padding"], str) else _per_axis(args["padding"], dims)
        layer = (nn.Conv1d if dims == 1 else nn.Conv2d)(
            weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
            stride=_per_axis(args["stride"], dims), padding=padding, dilation=_per_axis(args["dilation"], dims),
            groups=groups, bias=bias is not None, device="meta",
        )
    layer.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
    weight_node, bias_node = args["weight"], args["bias"]
    _replace_with_module(graph_module, node, owner, layer, args["input"])
    for attr_node in (weight_node, bias_node):
        if isinstance(attr_node, torch.fx.Node) and not attr_node.users:
            graph_module.graph.erase_node(attr_node)


def _per_axis(value: Any, dims: int) -> tuple[int, ...]:
    values = [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
    return tuple(values * dims) if len(values) == 1 else tuple(values)


def _lift_batchnorm(graph_module: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    args = _call_args(node, _BN_ARGS, {})
    if args.get("training") is not False or "running_var" not in args:
        return
    owner = _owner(graph_module, args["running_mean"], "running_mean")
    if owner is None or _owner(graph_module, args["running_var"], "running_var") != owner:
        return
    for key in ("weight", "bias"):
        if args[key] is not None and _owner(graph_module, args[key], key) != owner:
            return
    affine = args["weight"] is not None and args["bias"] is not None
    if not affine and (args["weight"] is not None or args["bias"] is not None):
        return
    params, buffers, has_children = _owned_tensors(graph_module, owner)
    if has_children or params != ({"weight", "bias"} if affine else set()) or \
            not {"running_mean", "running_var"} <= buffers <= {"running_mean", "running_var", "num_batches_tracked"}:
        return
    value = node.meta.get("val")
    rank = value.dim() if isinstance(value, torch.Tensor) else None
    if rank not in (2, 3, 4):
        return
    old = graph_module.get_submodule(owner)
    bn_cls = nn.BatchNorm2d if rank == 4 else nn.BatchNorm1d
    mean = old.running_mean
    layer = bn_cls(mean.shape[0], eps=float(args["eps"]), momentum=float(args["momentum"]), affine=affine,
                   device="meta")
    for name in sorted(params | buffers):
        tensor = getattr(old, name)
        if name in params:
            setattr(layer, name, tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor))
        else:
            layer.register_buffer(name, tensor)
    if "num_batches_tracked" not in buffers:
        layer.num_batches_tracked = None
    layer.eval()
    attr_nodes = [args[k] for k in ("weight", "bias", "running_mean", "running_var")]
    _replace_with_module(graph_module, node, owner, layer, args["input"])
    for attr_node in attr_nodes:
        if isinstance(attr_node, torch.fx.Node) and not attr_node.users:
            graph_module.graph.erase_node(attr_node)
    # num_batches_tracked may be read by a get_attr that nothing uses; dead code elimination keeps get_attr
    for other in list(graph_module.graph.nodes):
        if other.op == "get_attr" and str(other.target) == f"{owner}.num_batches_tracked" and not other.users:
            graph_module.graph.erase_node(other)


# -- helpers ------------------------------------------------------------------------------------
def torch_load_reason(error: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in a few words: the unpickler's own reason without
    torch's advice to load with ``weights_only=False`` (which would run code from the file)."""
    text = str(error)
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.S)
    if found:
        reason = _one_line_text(found.group(1))
    else:
        reason = f"{type(error).__name__}: {_first_line(error)}"
    reason = re.sub(r"\s*Check the documentation of torch\.load.*$", "", reason).rstrip(" .")
    return reason or type(error).__name__


def _one_line_text(text: str) -> str:
    return " ".join(text.split())


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
