"""Outputs of a command: checked before any work, staged beside their destination, published together.

``check_outputs`` refuses what cannot be written before the model is loaded. ``stage_model`` and
``stage_onnx`` write into a ``convfactor.files.atomic.StagedOutputs``, which moves every file into place with
an atomic rename at ``commit()``, or none of them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..files.atomic import StagedOutputs
from .console import Console
from .source import Source

__all__ = ["check_outputs", "report_file_for", "stage_model", "stage_onnx", "rename_paths"]


def check_outputs(paths: Sequence[Path], *, force: bool, inputs: Sequence[str | os.PathLike]) -> None:
    """Before any work: each output may be written (directory exists and is writable, no clobbering)."""
    from ..errors import ConvfactorError
    from ..files.atomic import check_writable
    from .checks import cannot_create_error

    resolved_inputs = {Path(p).resolve() for p in inputs if p}
    seen = set()
    for path in paths:
        resolved = path.resolve()
        if resolved in seen:
            raise ConvfactorError(f"{path} is given as two different outputs")
        seen.add(resolved)
        if resolved in resolved_inputs:
            raise ConvfactorError(f"output {path} is an input file; choose another name")
        if path.parent.exists() and not path.parent.is_dir():
            raise ConvfactorError(f"cannot write {path}: {path.parent} is not a directory")
        check_writable(path, force)
        try:  # the only reliable test (permissions, read-only filesystems, root): create a file there
            handle, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
            os.close(handle)
            os.unlink(probe)
        except OSError as bad:
            raise cannot_create_error(path, bad) from None


def report_file_for(out: Path) -> Path:
    """Where convert writes the JSON report of OUT: its stem + .report.json, beside it."""
    return out.with_name(out.stem + ".report.json") if out.suffix else out.with_name(out.name + ".report.json")


def stage_model(staging: StagedOutputs, out: Path, fast: Any, source: Source, example: Any,
                args: argparse.Namespace, console: Console) -> None:
    """Stage OUT: a torch.export program (.pt2), or a factorized checkpoint checked to reload first."""
    import torch

    from ..files.serialize import exported_program_bytes, factorized_payload

    if out.suffix == ".pt2":
        console.status(f"torch.export to {out}")
        data = exported_program_bytes(fast, example)
        staging.write(out, lambda p: p.write_bytes(data))
        return
    payload = factorized_payload(fast, arch=source.arch_record, input_shape=source.input_shape,
                                 leaf_modules=args.leaf_module)
    verify_reload(payload, fast, example, source.arch, args.trust_checkpoint, console)
    staging.write(out, lambda p: torch.save(payload, p))


def verify_reload(payload: dict[str, Any], fast: Any, example: Any, arch: Any, trust: bool,
                  console: Console) -> None:
    """Rebuild the model from the payload as ``convfactor.load`` will, so a file that would not reload is
    never written (an architecture whose structure changes between builds, say). ``arch`` is the user's
    ``--arch`` (None: the input file named its architecture, and was already allowed to)."""
    import torch

    from ..errors import CheckpointError
    from ..files.serialize import rebuild

    console.status("checking that the saved model reloads")
    reloaded = rebuild(payload, arch, trust_checkpoint=trust, trust_code=trust)
    if example is None:
        return  # rebuild already loaded the state_dict strictly: same structure, same tensors
    with torch.no_grad():
        expected = torch.utils._pytree.tree_leaves(fast(example))
        got = torch.utils._pytree.tree_leaves(reloaded(example))
    if len(got) != len(expected) or not all(torch.equal(a, b) for a, b in zip(got, expected)):
        raise CheckpointError("the factorized model would not reload to the same outputs (the architecture "
                              "builds differently each time?); nothing was written")


def rename_paths(data: Any, renamed: dict[str, str | None]) -> Any:
    """``data`` with paths of temporary files replaced: staged files by their destination, scratch by None."""
    if isinstance(data, dict):
        return {k: rename_paths(v, renamed) for k, v in data.items()}
    if isinstance(data, list):
        return [rename_paths(v, renamed) for v in data]
    if isinstance(data, str):
        for old, new in renamed.items():
            if data == old or data.startswith(old + os.sep):
                return new
    return data


def stage_onnx(staging: StagedOutputs, onnx_path: Path, model: Any, example: Any, args: argparse.Namespace,
               console: Console) -> tuple[dict[str, Any], Path]:
    """Stage the ``--onnx`` export (codebooks packed for shared weights); returns its record and staged path."""
    from ..runtime.export import export_onnx

    console.status(f"exporting ONNX to {onnx_path}")
    staged = staging.path_for(onnx_path)
    result = export_onnx(model, example, staged, opset=args.opset, dynamic_batch=not args.static_batch,
                         exporter=args.exporter, force=True)
    info = result.to_dict()
    if hasattr(model, "convfactor_sharing"):  # shared weights: store codebook + uint8 indices
        from ..share_onnx import pack_codebooks

        packed = pack_codebooks(staged)
        info["file_size"], info["packed_codebooks"] = packed.size_after, len(packed.packed)
    info["path"] = str(onnx_path)
    if result.external_data_path is not None:
        data_destination = onnx_path.with_name(result.external_data_path.name)
        staging.adopt(result.external_data_path, data_destination)
        info["external_data_path"] = str(data_destination)
    return info, staged

