"""The option groups several commands share, and the argparse types that read their values.

Each ``add_*`` function adds one group of options to a command's parser; the types (``memory_size``,
``unit_fraction``, the ``--concrete-arg`` reader) turn a bad value into argparse's one-line usage error
(exit 2) before anything is loaded.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

__all__ = ["add_model_arguments", "add_onnx_arguments", "add_check_arguments", "add_bench_arguments",
           "add_score_arguments", "add_output_arguments", "add_concrete_arg_argument", "read_score_options",
           "memory_size", "unit_fraction", "non_negative", "seconds", "positive_int"]

# kB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024 (as the IEC writes them); no unit: bytes.
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def memory_size(text: str) -> int:
    """A size in bytes from ``2GB``, ``512MiB``, ``1.5GiB`` or plain bytes (``1000000``).

    Raises:
        argparse.ArgumentTypeError: not a positive size with a known unit.
    """
    match = _SIZE.fullmatch(text)
    factor = _SIZE_UNITS.get(match.group(2).lower()) if match else None
    if factor is None:
        raise argparse.ArgumentTypeError(f"expected a size like 2GB, 512MiB or 1000000 (bytes), got {text!r}")
    size = int(float(match.group(1)) * factor)
    if size < 1:
        raise argparse.ArgumentTypeError(f"a size must be at least 1 byte, got {text!r}")
    return size


def _number(text: str) -> float:
    """``text`` as a float; NaN (outside every range) when it is not a number."""
    try:
        return float(text)
    except ValueError:
        return float("nan")


def unit_fraction(text: str) -> float:
    """A number in (0, 1], the range of a policy's fidelity bounds.

    Raises:
        argparse.ArgumentTypeError: not a number, or outside (0, 1].
    """
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def non_negative(text: str) -> float:
    """A finite number >= 0 (``--max-metric-drop 0.01``, in the metric's own units).

    Raises:
        argparse.ArgumentTypeError: not a number, negative or infinite.
    """
    value = _number(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1 (``--workers 2``).

    Raises:
        argparse.ArgumentTypeError: not a whole number, or below 1.
    """
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def seconds(text: str) -> float:
    """A positive, finite number of seconds (``--time-budget 120``).

    Raises:
        argparse.ArgumentTypeError: not a number, or not above 0.
    """
    value = _number(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_concrete_arg_argument(parser: argparse.ArgumentParser) -> None:
    """``--concrete-arg NAME=VALUE`` (repeatable): a non-tensor forward argument's value."""
    parser.add_argument("--concrete-arg", action="append", default=[], type=_concrete_arg, metavar="NAME=VALUE",
                        help="call forward with its non-tensor argument NAME set to VALUE (true, 3, 0.5, null, "
                             "text); arguments with plain defaults are traced with them unless given")


def _concrete_arg(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` -> (name, value): VALUE read as JSON (true, 3, 0.5, null, "x"), else as text."""
    name, sep, raw = text.partition("=")
    if not sep or not name.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, e.g. embed=false, got {text!r}")
    python_names = {"True": True, "False": False, "None": None}
    try:
        value = python_names[raw] if raw in python_names else json.loads(raw)
    except ValueError:
        value = raw
    return name.strip(), value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """CHECKPOINT and how to build it: ``--arch``, ``--arch-args``, ``--trust-checkpoint``, ``--input-shape``."""
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a state_dict (.pt/.pth), a factorized convfactor checkpoint, a torch.export "
                             "program (.pt2), or a pickled model (with --trust-checkpoint)")
    parser.add_argument("--arch", metavar="MODULE:FACTORY",
                        help="the function building the architecture of a state_dict or factorized checkpoint: "
                             "package.module:function (importable from the current directory) or "
                             "path/to/file.py:function")
    parser.add_argument("--arch-args", metavar="JSON", help="keyword arguments for the factory, as a JSON object")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="trust the file to run code: allow unpickling Python objects (a whole pickled "
                             "model) and importing the architecture factory a factorized checkpoint names "
                             "(otherwise give --arch); only for files you trust")
    parser.add_argument("--input-shape", metavar="N,C,H,W",
                        help="example input shape, integers separated by commas, e.g. 1,3,224,224 (default: the "
                             "architecture's, if it declares "
                             "one); needed for MACs, ONNX, .pt2, --check and --bench")


def add_onnx_arguments(parser: argparse.ArgumentParser) -> None:
    """How to export: ``--opset``, ``--static-batch``, ``--exporter``."""
    parser.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--static-batch", action="store_true", help="export a fixed batch size (default: dynamic)")
    parser.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                        help="ONNX exporter (default: auto = dynamo, TorchScript if dynamo fails)")


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--check`` tolerances."""
    group = parser.add_argument_group("fidelity tolerances (--check)")
    group.add_argument("--check-samples", type=int, default=32, metavar="N",
                       help="random samples to compare (default 32)")
    group.add_argument("--max-rel-l2", type=float, default=0.1, metavar="X",
                       help="largest ||a-b||/||a|| of each output's worst slice along its feature axis (default 0.1)")
    group.add_argument("--min-cosine", type=float, default=0.99, metavar="X", help="default 0.99")
    group.add_argument("--min-snr-db", type=float, default=20.0, metavar="DB", help="default 20")
    group.add_argument("--min-top1", type=float, default=0.9, metavar="X",
                       help="smallest top-1 agreement of the outputs declared as class scores or probabilities "
                            "(--class-scores, --class-probabilities, or the policy's fidelity outputs; default 0.9)")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """How to time: ``--threads``, ``--warmup``, ``--repeats``, ``--min-time``."""
    group = parser.add_argument_group("latency (bench)")
    group.add_argument("--threads", metavar="N[,N]", help="intra-op thread counts (default: 1 and all cores)")
    group.add_argument("--warmup", type=int, default=10, metavar="N", help="untimed runs first (default 10)")
    group.add_argument("--repeats", type=int, default=50, metavar="N", help="minimum timed runs (default 50)")
    group.add_argument("--min-time", type=float, default=1.0, metavar="S",
                       help="keep timing for at least S seconds per thread setting (default 1)")


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    """The challenge score's bits and pruning ratios."""
    group = parser.add_argument_group("challenge score (efficient-deep-learning course formula)")
    group.add_argument("--weight-bits", type=int, default=32, metavar="Q", help="q_w (default 32)")
    group.add_argument("--activation-bits", type=int, default=32, metavar="Q", help="q_a (default 32)")
    group.add_argument("--structured-pruning", type=float, default=0.0, metavar="P", help="p_s (default 0)")
    group.add_argument("--unstructured-pruning", type=float, default=0.0, metavar="P", help="p_u (default 0)")


def read_score_options(args: argparse.Namespace) -> dict[str, Any]:
    """The challenge-score keyword arguments, checked before any work is done."""
    from ..score import challenge_score

    options = {"weight_bits": args.weight_bits, "activation_bits": args.activation_bits,
               "structured_pruning": args.structured_pruning, "unstructured_pruning": args.unstructured_pruning}
    from ..errors import ConvfactorError

    try:
        challenge_score(1, 1, **options)  # validates the options before any work is done
    except ConvfactorError as error:  # the library names its arguments; the user typed flags
        text = str(error).replace("weight bits", "--weight-bits").replace("activation bits", "--activation-bits")
        text = text.replace("pruning ratios", "--structured-pruning and --unstructured-pruning")
        raise ConvfactorError(text) from None
    return options


def add_output_arguments(parser: argparse.ArgumentParser, *, force: bool) -> None:
    """``--json``, ``--quiet``, and ``--force`` for a command that writes files."""
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument("--quiet", action="store_true", help="print only errors (and --json output)")
    if force:
        parser.add_argument("--force", action="store_true", help="overwrite existing output files")

