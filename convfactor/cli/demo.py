"""``convfactor demo``: the whole pipeline on a shipped trained model (``convfactor.demo.run_demo``)."""

from __future__ import annotations

import argparse

from .console import EXIT_OK, Console
from .options import add_output_arguments

__all__ = ["NAME", "HELP", "EXAMPLES", "add_arguments", "run"]

NAME = "demo"
HELP = "run the whole pipeline on a shipped trained model (a few minutes on two CPU cores)"
EXAMPLES = """\
examples:
  convfactor demo                                   # ResNet-20 on digits, MACs budgets 0.5/0.25
  convfactor demo --model mobilenet_digits --budgets 0.5 --out-dir /tmp/demo --force
  convfactor demo --method spatial_svd --threads 2 --json
"""


def add_arguments(demo: argparse.ArgumentParser) -> None:
    """The options of ``demo``."""
    demo.add_argument("--model", default="resnet20_digits", metavar="NAME",
                      help="shipped checkpoint: resnet20_digits (default) or mobilenet_digits")
    demo.add_argument("--budgets", default="0.5,0.25", metavar="F[,F]",
                      help="MAC targets as fractions of the original (default 0.5,0.25)")
    demo.add_argument("--method", default="auto", metavar="METHOD",
                      help="'auto' (chosen per layer, default) or one method for every conv")
    demo.add_argument("--out-dir", default="convfactor-demo", metavar="DIR",
                      help="where the ONNX files, report.json and demo.png go (default ./convfactor-demo)")
    demo.add_argument("--threads", type=int, default=1, metavar="N", help="onnxruntime threads for timing")
    demo.add_argument("--min-time", type=float, default=1.0, metavar="S",
                      help="seconds of timing, all models together in rotating rounds (default 1.0)")
    demo.add_argument("--no-plot", action="store_true", help="do not write demo.png")
    add_output_arguments(demo, force=True)


def run(args: argparse.Namespace, console: Console) -> int:
    """Run ``demo``; returns the exit code."""
    from ..demo import run_demo
    from ..errors import ConvfactorError

    try:
        budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        raise ConvfactorError(f"--budgets must be fractions separated by commas, got {args.budgets!r}") from None
    if args.threads < 1 or args.min_time < 0:
        raise ConvfactorError("--threads must be >= 1 and --min-time >= 0")
    if args.method != "auto":
        from ..methods import get_method

        get_method(args.method)
    document = run_demo(args.model, budgets, args.out_dir, method=args.method, threads=args.threads,
                        min_time=args.min_time, plot=not args.no_plot, force=args.force,
                        progress=console.progress, say=console.result if not args.json else console.status)
    if args.json:
        console.document(document)
    return EXIT_OK
