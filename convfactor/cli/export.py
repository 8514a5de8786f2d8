"""``convfactor export``: a checkpoint (factorized or not) to ONNX."""

from __future__ import annotations

import argparse
from pathlib import Path

from .console import EXIT_OK, Console
from .options import add_model_arguments, add_onnx_arguments, add_output_arguments

__all__ = ["NAME", "HELP", "EXAMPLES", "add_arguments", "run"]

NAME = "export"
HELP = "export a checkpoint (factorized or not) to ONNX"
EXAMPLES = """\
examples:
  convfactor export resnet_svd.pt --arch models:resnet20 --onnx resnet_svd.onnx   # factorized: plan applied
  convfactor export resnet.pt --arch models:resnet20 --onnx resnet.onnx --input-shape 1,3,32,32
"""


def add_arguments(export: argparse.ArgumentParser) -> None:
    """The options of ``export``."""
    add_model_arguments(export)
    export.add_argument("--onnx", required=True, metavar="OUT.onnx", help="the ONNX file to write")
    add_onnx_arguments(export)
    add_output_arguments(export, force=True)


def run(args: argparse.Namespace, console: Console) -> int:
    """Run ``export``; returns the exit code."""
    from ..files.architecture import parse_input_shape
    from ..runtime.export import export_onnx
    from .checks import check_onnx_name, example_input
    from .outputs import check_outputs
    from .source import load_source, require_shape, resolve_arch_option

    shape = parse_input_shape(args.input_shape)
    onnx_path = Path(args.onnx)
    check_onnx_name(onnx_path)
    check_outputs([onnx_path], force=args.force, inputs=[args.checkpoint])
    arch = resolve_arch_option(args.arch, args.arch_args)
    source = load_source(args.checkpoint, arch, trust=args.trust_checkpoint, input_shape=shape, console=console)
    x = example_input(source.model, require_shape(source, "to export"))
    console.status(f"exporting ONNX to {onnx_path}")
    result = export_onnx(source.model, x, onnx_path, opset=args.opset, dynamic_batch=not args.static_batch,
                         exporter=args.exporter, force=args.force)
    if args.json:
        console.document({"command": "export", "input": source.describe(), "onnx": result.to_dict()})
    else:
        console.result(str(result))
    return EXIT_OK
