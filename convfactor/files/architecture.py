"""Resolving ``--arch``: the code that builds the model a checkpoint's weights belong to.

An architecture is ``"package.module:factory"`` (importable from the current directory) or
``"path/to/file.py:factory"``, with keyword arguments; a factory may declare its input shape
(``factory.input_shape``). A factory a file names is imported only when the caller trusts the file, or
when it is one of convfactor's own zoo models (``stored_architecture``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from ..errors import CheckpointError, ConvfactorError, one_line

__all__ = ["Architecture", "resolve_arch", "stored_architecture", "builtin_factories", "parse_arch_kwargs",
           "parse_input_shape", "cwd_importable", "import_callable"]


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
                                  f"failed: {one_line(bad)}") from None
        except Exception as bad:  # the user's code failed: say where, keep it to one line
            raise ConvfactorError(f"--arch {self.factory} raised {type(bad).__name__}: {one_line(bad)}") from None
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
    build_fn, factory = import_callable(spec, "--arch", "factory")
    kwargs = dict(kwargs or {})
    return Architecture(factory, kwargs, build_fn, _declared_input_shape(factory, build_fn, kwargs))



def import_callable(spec: str, flag: str, what: str) -> tuple[Callable[..., Any], str]:
    """The callable ``spec`` names (``"pkg.module:name"`` or ``"path/file.py:name"``) and its storable form.

    Only for a spec the user gave on the command line or in Python: importing runs code. Errors name
    ``flag`` (``--arch``, ``--metric``) and say what was expected (``what``: "factory", "function").
    """
    module_part, sep, attribute = spec.rpartition(":")
    if not sep or not module_part or not attribute or not attribute.isidentifier():
        raise ConvfactorError(f"{flag} must look like 'package.module:{what}' or 'path/to/file.py:{what}', "
                              f"got {spec!r}")
    if module_part.endswith(".py") or os.sep in module_part or "/" in module_part:
        path = Path(module_part).expanduser().resolve()
        with cwd_importable():
            module = _import_file(path, spec, flag)
        stored = f"{path}:{attribute}"
    else:
        with cwd_importable():
            module = _import_module(module_part, spec, flag)
        stored = spec
    found = getattr(module, attribute, None)
    if found is None:
        raise ConvfactorError(f"{flag} {spec}: module {module_part!r} has no attribute {attribute!r}")
    if not callable(found):
        raise ConvfactorError(f"{flag} {spec}: {attribute!r} is a {type(found).__name__}, not a callable")
    return found, stored


def builtin_factories() -> set[str]:
    """The factories of convfactor's own zoo: code shipped with convfactor, safe for any file to name."""
    from ..zoo import MODELS

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



def _import_module(name: str, spec: str, flag: str = "--arch") -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as missing:
        if missing.name and (name == missing.name or name.startswith(missing.name + ".")):
            raise ConvfactorError(f"{flag} {spec}: no module named {name!r} (looked in the current directory "
                                  f"and the installed packages)") from None
        raise ConvfactorError(f"{flag} {spec}: importing {name!r} failed: {one_line(missing)}") from None
    except Exception as bad:  # a syntax error or a failing import inside the user's module
        raise ConvfactorError(f"{flag} {spec}: importing {name!r} failed with {type(bad).__name__}: "
                              f"{one_line(bad)}") from None



def _import_file(path: Path, spec: str, flag: str = "--arch") -> Any:
    if not path.is_file():
        raise ConvfactorError(f"{flag} {spec}: file {path} not found")
    # A name derived from the full path: two files called model.py in different folders stay apart.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", path.stem)
    module_name = f"convfactor_arch_{stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConvfactorError(f"{flag} {spec}: {path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    sys.path.insert(0, str(path.parent))  # so the file can import its neighbours
    try:
        module_spec.loader.exec_module(module)
    except Exception as bad:
        del sys.modules[module_name]
        raise ConvfactorError(f"{flag} {spec}: importing {path.name} failed with {type(bad).__name__}: "
                              f"{one_line(bad)}") from None
    finally:
        sys.path.remove(str(path.parent))
    return module



def _declared_input_shape(factory: str, build_fn: Any, kwargs: Mapping[str, Any]) -> tuple[int, ...] | None:
    """A zoo model's input shape (with ``in_channels`` applied), or the factory's ``input_shape`` attribute."""
    declared = _shape_or_none(getattr(build_fn, "input_shape", None))
    if declared is not None:
        return declared
    try:
        from ..zoo import MODELS
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



@contextlib.contextmanager
def cwd_importable() -> Iterator[None]:
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
