"""Loading the model a command names: a checkpoint file plus, for a state_dict, the ``--arch`` factory.

``load_source`` reads any checkpoint kind (state_dict, pickled module, torch.export program, factorized
convfactor checkpoint), builds the model, loads and checks its weights and returns it with a record of
how it was obtained (for the JSON documents) and the input shape to use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .console import Console

__all__ = ["Source", "resolve_arch_option", "load_source", "require_shape"]


@dataclass
class Source:
    """A loaded model and how it was obtained."""

    model: Any
    path: Path
    kind: str  # state_dict | module | exported | factorized
    arch_record: dict[str, Any]
    input_shape: tuple[int, ...] | None
    notes: list[str] = field(default_factory=list)
    arch: Any = None  # the user's --arch (an Architecture) when it built the model

    def describe(self) -> dict[str, Any]:
        return {"checkpoint": str(self.path), "kind": self.kind, "arch": self.arch_record,
                "input_shape": None if self.input_shape is None else list(self.input_shape), "notes": self.notes}


def resolve_arch_option(spec: str | None, arch_args: str | None):
    """The ``--arch``/``--arch-args`` architecture, or None when ``--arch`` is not given."""
    from ..errors import ConvfactorError
    from ..files.architecture import parse_arch_kwargs, resolve_arch

    kwargs = parse_arch_kwargs(arch_args)
    if spec is None:
        if kwargs:
            raise ConvfactorError("--arch-args needs --arch")
        return None
    return resolve_arch(spec, kwargs)


def load_source(path: str, arch, *, trust: bool, input_shape: tuple[int, ...] | None, console: Console,
                what: str = "checkpoint") -> Source:
    """Read the checkpoint and build the model it describes (weights loaded, finite, eval mode)."""
    from ..errors import CheckpointError
    from ..files.checkpoint import check_finite, load_weights, read_checkpoint
    from ..files.exported_program import lift_exported_module

    console.status(f"loading {path}")
    checkpoint = read_checkpoint(path, trust=trust)
    resolved = checkpoint.path.resolve()
    notes = list(checkpoint.notes)
    if checkpoint.kind in ("module", "exported") and arch is not None:
        notes.append(f"--arch ignored: the {what} holds the whole model")
        console.status(f"note: {notes[-1]}")
    default_shape = None
    if checkpoint.kind == "state_dict":
        if arch is None:
            raise CheckpointError(f"{path} holds a state_dict: pass --arch MODULE:FACTORY to say which architecture "
                                  f"it belongs to")
        model = arch.build()
        load_weights(model, checkpoint.content, where=f"state_dict in {path}")
        record, default_shape = arch.to_dict(), arch.input_shape
    elif checkpoint.kind == "module":
        model = checkpoint.content
        record = {"checkpoint": str(resolved), "kind": "module"}
        default_shape = _shape_attribute(model)
    elif checkpoint.kind == "exported":
        model = lift_exported_module(checkpoint.content)
        record = {"checkpoint": str(resolved), "kind": "exported"}
        default_shape = _exported_input_shape(checkpoint.content)
        notes.append("torch.export program: aten conv/linear/batch_norm calls lifted to modules")
    else:  # factorized
        from ..files.serialize import rebuild

        payload = checkpoint.content
        model = _rebuild(rebuild, payload, arch, trust, path)
        record = dict(payload.get("arch") or {})
        default_shape = tuple(payload["input_shape"]) if payload.get("input_shape") else None
        notes.append(f"factorized checkpoint: plan with {len(payload['plan']['layers'])} replaced layer(s) applied")
    model.eval()
    check_finite(model, what)
    used_arch = arch if checkpoint.kind in ("state_dict", "factorized") else None
    return Source(model, checkpoint.path, checkpoint.kind, record, input_shape or default_shape, notes, used_arch)


def _rebuild(rebuild: Any, payload: dict[str, Any], arch: Any, trust: bool, path: str) -> Any:
    """``rebuild`` of a factorized checkpoint; when it fails with an ``--arch`` other than the one the file
    was factorized from, the error says so and names the right ``--arch`` (the architecture, not tracing,
    is what differs: ``--no-trace`` would not help)."""
    from ..errors import ConvfactorError, TraceError

    try:
        return rebuild(payload, arch, trust_checkpoint=trust, trust_code=trust, where=path)
    except ConvfactorError as error:
        saved = payload.get("arch") or {}
        if arch is None or not saved.get("factory") or saved == arch.to_dict():
            raise
        given = arch.to_dict()
        args = f" --arch-args '{json.dumps(saved['kwargs'])}'" if saved.get("kwargs") else ""
        other = (f"--arch {given['factory']} with other --arch-args" if saved["factory"] == given["factory"]
                 else f"--arch {given['factory']}")
        # The tracer's advice (--leaf-module, --no-trace) is for the model it traced, not the one in the file.
        why = str(error).split(";")[0] if isinstance(error, TraceError) else str(error)
        right = f"--arch {saved['factory']}{args or ' without --arch-args'}"
        raise ConvfactorError(f"{path} was factorized from {right}, not {other}; give {right} ({why})") from None


def _shape_attribute(model: Any) -> tuple[int, ...] | None:
    from ..errors import ConvfactorError
    from ..files.architecture import parse_input_shape

    value = getattr(model, "input_shape", None)
    try:
        return parse_input_shape(value) if isinstance(value, (tuple, list)) else None
    except ConvfactorError:
        return None


def _exported_input_shape(program: Any) -> tuple[int, ...] | None:
    import torch

    example = getattr(program, "example_inputs", None)
    try:
        args, kwargs = example
    except (TypeError, ValueError):
        return None
    if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
        return tuple(int(d) for d in args[0].shape)
    return None


def require_shape(source: Source, why: str) -> tuple[int, ...]:
    """The input shape, or an error saying ``--input-shape`` is needed ``why``."""
    from ..errors import ConvfactorError

    if source.input_shape is None:
        raise ConvfactorError(f"--input-shape is required {why} (the architecture declares no default), "
                              f"e.g. --input-shape 1,3,224,224")
    return source.input_shape

