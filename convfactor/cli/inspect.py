"""``convfactor inspect``: the per-layer table of a checkpoint before it is factorized.

The numbers come from ``convfactor.inspect_model`` (the library); this module parses the options,
loads the model and prints the table (``inspect_table``) or the JSON document.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

from .console import EXIT_OK, Console
from .options import add_concrete_arg_argument, add_model_arguments, add_output_arguments, add_score_arguments

__all__ = ["NAME", "HELP", "EXAMPLES", "add_arguments", "run"]

NAME = "inspect"
HELP = "per-layer table: geometry, params, MACs and singular-value energy per method"
EXAMPLES = """\
examples:
  convfactor inspect resnet.pt --arch convfactor.zoo.resnet:resnet20
  convfactor inspect ckpt.pth --arch net.py:build --input-shape 1,3,64,64 --json

energy columns: the fraction of squared singular values kept at 25%/50%/75% of the method's full
rank (the smallest over its rank components); '-': the method has no singular-value spectrum;
'n/a': the method cannot represent the layer.
"""


def add_arguments(inspect: argparse.ArgumentParser) -> None:
    """The options of ``inspect``."""
    add_model_arguments(inspect)
    inspect.add_argument("--methods", metavar="M1,M2", help="methods to show energy for (default: all)")
    inspect.add_argument("--wide", action="store_true",
                         help="every column: type, stride, groups and energy at 25/50/75%% for every method "
                              "(the default table fits 100 columns)")
    add_concrete_arg_argument(inspect)
    add_score_arguments(inspect)
    add_output_arguments(inspect, force=False)


def run(args: argparse.Namespace, console: Console) -> int:
    """Run ``inspect``; returns the exit code."""
    from ..errors import ConvfactorError
    from ..files.architecture import parse_input_shape
    from ..inspection import inspect_model
    from ..methods import available_methods
    from .checks import example_input
    from .inspect_table import format_inspect_table
    from .options import read_score_options
    from .source import load_source, require_shape, resolve_arch_option

    shape = parse_input_shape(args.input_shape)
    methods = available_methods()
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in methods]
        if unknown or not wanted:
            raise ConvfactorError(f"--methods: unknown method {unknown[0] if unknown else args.methods!r}; "
                                  f"known: {', '.join(methods)}")
        methods = wanted
    arch = resolve_arch_option(args.arch, args.arch_args)
    source = load_source(args.checkpoint, arch, trust=args.trust_checkpoint, input_shape=shape, console=console)
    if args.concrete_arg:  # the model was loaded here: its forward is ours to bind
        source.model.forward = functools.partial(source.model.forward, **dict(args.concrete_arg))
    x = example_input(source.model, require_shape(source, "to count MACs"))
    score_options = read_score_options(args)
    console.status("computing spectra")
    table = inspect_model(source.model, x, methods)
    table["challenge_score"] = _inspect_score(table, score_options)
    if args.json:
        console.document({"command": "inspect", "input": source.describe(), **table})
    else:
        console.result(format_inspect_table(table, wide=args.wide))
    return EXIT_OK


def _inspect_score(table: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    from ..score import challenge_score

    return challenge_score(table["totals"]["params"], table["totals"]["layer_macs"], **options).to_dict()
