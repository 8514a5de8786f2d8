"""The ``convfactor`` command line: convert, inspect, export, bench, methods.

Exit codes: 0 success; 1 the fidelity check (``--check``) failed its tolerances (files are still
written, the report says so); 2 a user error, printed as one line ``error: ...`` on stderr with
nothing written. Anything else is a bug and keeps its traceback.

Every command first validates what it can without loading the model (paths, output locations,
policy, input shape, ``--arch``), then loads, checks the weights (finite) and the input shape (one
forward pass), and only then does the work. Outputs are written to a hidden staging directory beside
their destination and moved into place together at the end, each with an atomic rename.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files.atomic import StagedOutputs
from .inspect_table import format_inspect_table

__all__ = ["main", "build_parser", "inspect_layers", "format_inspect_table"]

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2
ENERGY_FRACTIONS = (0.25, 0.5, 0.75)

_CONVERT_EXAMPLES = """\
examples:
  # a state_dict + the function that builds its architecture (importable from the current directory)
  convfactor convert resnet.pt --arch models:resnet20 --policy spatial_svd:0.5 --out resnet_svd.pt

  # a model file by path, factory arguments as JSON, a YAML policy, ONNX + fidelity check + latency
  convfactor convert ckpt.pth --arch path/to/net.py:build --arch-args '{"num_classes": 100}' \\
      --policy policy.yaml --input-shape 1,3,224,224 --out net.pt --onnx net.onnx --check --bench

  # a torch.export program in, a torch.export program out
  convfactor convert model.pt2 --policy tucker2:energy=0.9 --out model_tucker.pt2

outputs: OUT (reload with convfactor.load(OUT), or a .pt2 program), OUT's stem + .report.json
(the full JSON report), and --onnx. Nothing is written if any step fails.
exit codes: 0 ok, 1 --check failed (files written, report marks it), 2 bad input (nothing written).
"""

_INSPECT_EXAMPLES = """\
examples:
  convfactor inspect resnet.pt --arch convfactor.zoo.resnet:resnet20
  convfactor inspect ckpt.pth --arch net.py:build --input-shape 1,3,64,64 --json

energy columns: the fraction of squared singular values kept at 25%/50%/75% of the method's full
rank (the smallest over its rank components); '-': the method has no singular-value spectrum;
'n/a': the method cannot represent the layer.
"""

_EXPORT_EXAMPLES = """\
examples:
  convfactor export resnet_svd.pt --arch models:resnet20 --onnx resnet_svd.onnx   # factorized: plan applied
  convfactor export resnet.pt --arch models:resnet20 --onnx resnet.onnx --input-shape 1,3,32,32
"""

_BENCH_EXAMPLES = """\
examples:
  convfactor bench resnet_svd.pt --arch models:resnet20 --baseline resnet.pt
  convfactor bench resnet_svd.pt --arch models:resnet20 --threads 1 --repeats 100   # the model alone

A factorized checkpoint stores nothing of the original weights, so without --baseline the model
is timed alone. The factory a factorized checkpoint names is used only with --trust-checkpoint;
otherwise give --arch.
"""

_DEMO_EXAMPLES = """\
examples:
  convfactor demo                                   # ResNet-20 on digits, MACs budgets 0.5/0.25
  convfactor demo --model mobilenet_digits --budgets 0.5 --out-dir /tmp/demo --force
  convfactor demo --method spatial_svd --threads 2 --json
"""

_METHODS_EXAMPLES = """\
examples:
  convfactor methods
  convfactor methods --json
"""


# -- argument parsing ---------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: ...``) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _version_text() -> str:
    from . import __version__

    return f"convfactor {__version__}"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``convfactor`` command (subcommands and their options)."""
    parser = _Parser(prog="convfactor", description="Factorize the convolutions of a trained PyTorch CNN, "
                     "export it to ONNX and measure fidelity and latency in onnxruntime.",
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="run 'convfactor COMMAND --help' for the options and examples of each command")
    parser.add_argument("--version", action="version", version=_version_text())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    def command(name: str, help_text: str, epilog: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

    convert = command("convert", "factorize a checkpoint and save it (optionally ONNX, fidelity check, latency)",
                      _CONVERT_EXAMPLES)
    _add_model_arguments(convert)
    convert.add_argument("--policy", required=True, metavar="POLICY",
                         help="a .yaml/.json policy file, or a method shorthand: spatial_svd, tucker2:0.5, "
                              "svd:energy=0.95 (every eligible layer)")
    convert.add_argument("--out", required=True, metavar="OUT",
                         help="the factorized model: .pt or .pth (reloadable with convfactor.load) or .pt2 "
                              "(torch.export program); for ONNX use --onnx")
    convert.add_argument("--onnx", metavar="OUT.onnx", help="also export the factorized model to ONNX")
    convert.add_argument("--check", action="store_true",
                         help="compare original and factorized in onnxruntime; exit 1 if a tolerance fails")
    convert.add_argument("--bench", action="store_true", help="time original and factorized in onnxruntime")
    convert.add_argument("--profile", action="store_true",
                         help="profile both models in onnxruntime and show each replaced layer's measured time "
                              "ratio next to its MACs ratio")
    convert.add_argument("--calibration", metavar="INPUTS.pt",
                         help="a tensor of real inputs (N, ...) saved with torch.save (or .npy): data-aware "
                              "factorization and sensitivities for a policy with a target or 'auto' rules")
    convert.add_argument("--check-inputs", metavar="INPUTS.pt",
                         help="a tensor of real inputs for --check instead of generated standard-normal ones "
                              "(random inputs check the math, not accuracy)")
    convert.add_argument("--share-weights", metavar="SPEC",
                         help="then share each layer's weights through a k-means codebook: bits=N, clusters=K "
                              "or elbow (the ONNX file stores codebook + uint8 indices; the score counts q_w)")
    convert.add_argument("--no-fold-bn", action="store_true", help="do not fold BatchNorm into the convs first")
    convert.add_argument("--no-trace", action="store_true",
                         help="replace modules without a torch.fx graph (for untraceable models; no BN folding)")
    convert.add_argument("--leaf-module", action="extend", nargs="+", default=[], metavar="NAME",
                         help="module names or class names torch.fx should not trace into")
    _add_concrete_arg_argument(convert)
    _add_onnx_arguments(convert)
    _add_check_arguments(convert)
    _add_bench_arguments(convert)
    _add_score_arguments(convert)
    _add_output_arguments(convert, force=True)
    convert.set_defaults(handler=_cmd_convert)

    inspect = command("inspect", "per-layer table: geometry, params, MACs and singular-value energy per method",
                      _INSPECT_EXAMPLES)
    _add_model_arguments(inspect)
    inspect.add_argument("--methods", metavar="M1,M2", help="methods to show energy for (default: all)")
    inspect.add_argument("--wide", action="store_true",
                         help="every column: type, stride, groups and energy at 25/50/75%% for every method "
                              "(the default table fits 100 columns)")
    _add_concrete_arg_argument(inspect)
    _add_score_arguments(inspect)
    _add_output_arguments(inspect, force=False)
    inspect.set_defaults(handler=_cmd_inspect)

    export = command("export", "export a checkpoint (factorized or not) to ONNX", _EXPORT_EXAMPLES)
    _add_model_arguments(export)
    export.add_argument("--onnx", required=True, metavar="OUT.onnx", help="the ONNX file to write")
    _add_onnx_arguments(export)
    _add_output_arguments(export, force=True)
    export.set_defaults(handler=_cmd_export)

    bench = command("bench", "time a checkpoint (factorized or not) in onnxruntime, against a baseline if given",
                    _BENCH_EXAMPLES)
    _add_model_arguments(bench)
    bench.add_argument("--baseline", metavar="CHECKPOINT2", help="the model to compare against (e.g. the original)")
    bench.add_argument("--baseline-arch", metavar="MODULE:FACTORY",
                       help="architecture of a state_dict baseline (default: --arch, or the factorized "
                            "checkpoint's stored architecture)")
    bench.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                       help="ONNX exporter (default: auto = dynamo, TorchScript if dynamo fails)")
    _add_bench_arguments(bench)
    _add_output_arguments(bench, force=False)
    bench.set_defaults(handler=_cmd_bench)

    demo = command("demo", "run the whole pipeline on a shipped trained model (122 s measured on a busy 2-core "
                           "machine)", _DEMO_EXAMPLES)
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
    _add_output_arguments(demo, force=True)
    demo.set_defaults(handler=_cmd_demo)

    methods = command("methods", "list the factorization methods, their math and what their rank means",
                      _METHODS_EXAMPLES)
    _add_output_arguments(methods, force=False)
    methods.set_defaults(handler=_cmd_methods)
    return parser


def _add_concrete_arg_argument(parser: argparse.ArgumentParser) -> None:
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


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
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


def _add_onnx_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--static-batch", action="store_true", help="export a fixed batch size (default: dynamic)")
    parser.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                        help="ONNX exporter (default: auto = dynamo, TorchScript if dynamo fails)")


def _add_check_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fidelity tolerances (--check)")
    group.add_argument("--check-samples", type=int, default=32, metavar="N",
                       help="random samples to compare (default 32)")
    group.add_argument("--max-rel-l2", type=float, default=0.1, metavar="X",
                       help="largest ||a-b||/||a|| of the outputs (default 0.1)")
    group.add_argument("--min-cosine", type=float, default=0.99, metavar="X", help="default 0.99")
    group.add_argument("--min-snr-db", type=float, default=20.0, metavar="DB", help="default 20")
    group.add_argument("--min-top1", type=float, default=0.9, metavar="X",
                       help="smallest top-1 agreement of classifier outputs (default 0.9)")


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("latency (bench)")
    group.add_argument("--threads", metavar="N[,N]", help="intra-op thread counts (default: 1 and all cores)")
    group.add_argument("--warmup", type=int, default=10, metavar="N", help="untimed runs first (default 10)")
    group.add_argument("--repeats", type=int, default=50, metavar="N", help="minimum timed runs (default 50)")
    group.add_argument("--min-time", type=float, default=1.0, metavar="S",
                       help="keep timing for at least S seconds per thread setting (default 1)")


def _add_score_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("challenge score (efficient-deep-learning course formula)")
    group.add_argument("--weight-bits", type=int, default=32, metavar="Q", help="q_w (default 32)")
    group.add_argument("--activation-bits", type=int, default=32, metavar="Q", help="q_a (default 32)")
    group.add_argument("--structured-pruning", type=float, default=0.0, metavar="P", help="p_s (default 0)")
    group.add_argument("--unstructured-pruning", type=float, default=0.0, metavar="P", help="p_u (default 0)")


def _score_options(args: argparse.Namespace) -> dict[str, Any]:
    from .score import challenge_score

    options = {"weight_bits": args.weight_bits, "activation_bits": args.activation_bits,
               "structured_pruning": args.structured_pruning, "unstructured_pruning": args.unstructured_pruning}
    challenge_score(1, 1, **options)  # validates the options before any work is done
    return options


def _add_output_arguments(parser: argparse.ArgumentParser, *, force: bool) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument("--quiet", action="store_true", help="print only errors (and --json output)")
    if force:
        parser.add_argument("--force", action="store_true", help="overwrite existing output files")


# -- entry point --------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 fidelity check failed, 2 user error).

    Example:
        >>> main(["methods"])
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error already printed
        return done.code if isinstance(done.code, int) else EXIT_USAGE
    from .errors import ConvfactorError

    console = _Console(args.quiet)
    try:
        with console.warnings_filtered():
            return args.handler(args, console)
    except ConvfactorError as error:
        console.error(str(error))
        return EXIT_USAGE
    except OSError as error:  # the disk, not the code: full, read-only, removed under our feet
        where = f" ({error.filename})" if error.filename else ""
        console.error(f"{error.strerror or error}{where}; nothing was written")
        return EXIT_USAGE
    except KeyboardInterrupt:
        console.error("interrupted")
        return 130


class _Console:
    """Where messages go: results to stdout, progress and notes to stderr, nothing but errors if quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        # Bars on a terminal; in logs and pipes (where redraws are noise) plain lines with count and ETA.
        self.progress: bool | str = False if quiet else (True if sys.stderr.isatty() else "lines")

    def status(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def result(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    def document(self, data: Any) -> None:
        print(json.dumps(data, indent=2, default=str), flush=True)

    def error(self, message: str) -> None:
        print(f"error: {_one_line(message)}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def warnings_filtered(self) -> Iterator[None]:
        with warnings.catch_warnings():
            if self.quiet:
                warnings.simplefilter("ignore")
            yield


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "unknown error"


# -- loading the model --------------------------------------------------------------------------
@dataclass
class _Source:
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


def _resolve_arch_option(spec: str | None, arch_args: str | None):
    from .errors import ConvfactorError
    from .files.architecture import parse_arch_kwargs, resolve_arch

    kwargs = parse_arch_kwargs(arch_args)
    if spec is None:
        if kwargs:
            raise ConvfactorError("--arch-args needs --arch")
        return None
    return resolve_arch(spec, kwargs)


def _load_source(path: str, arch, *, trust: bool, input_shape: tuple[int, ...] | None, console: _Console,
                 what: str = "checkpoint") -> _Source:
    """Read the checkpoint and build the model it describes (weights loaded, finite, eval mode)."""
    from .errors import CheckpointError
    from .files.checkpoint import check_finite, load_weights, read_checkpoint
    from .files.exported_program import lift_exported_module

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
        from .files.serialize import rebuild

        payload = checkpoint.content
        model = rebuild(payload, arch, trust_checkpoint=trust, trust_code=trust, where=path)
        record = dict(payload.get("arch") or {})
        default_shape = tuple(payload["input_shape"]) if payload.get("input_shape") else None
        notes.append(f"factorized checkpoint: plan with {len(payload['plan']['layers'])} replaced layer(s) applied")
    model.eval()
    check_finite(model, what)
    used_arch = arch if checkpoint.kind in ("state_dict", "factorized") else None
    return _Source(model, checkpoint.path, checkpoint.kind, record, input_shape or default_shape, notes, used_arch)


def _shape_attribute(model: Any) -> tuple[int, ...] | None:
    from .errors import ConvfactorError
    from .files.architecture import parse_input_shape

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


def _require_shape(source: _Source, why: str) -> tuple[int, ...]:
    from .errors import ConvfactorError

    if source.input_shape is None:
        raise ConvfactorError(f"--input-shape is required {why} (the architecture declares no default), "
                              f"e.g. --input-shape 1,3,224,224")
    return source.input_shape


def _example_input(model: Any, shape: Sequence[int]):
    """A zero tensor of ``shape`` on the model's dtype, after checking the model accepts it."""
    from .cli_checks import example_input

    return example_input(model, tuple(shape), _one_line)


# -- outputs ------------------------------------------------------------------------------------
def _check_outputs(paths: Sequence[Path], *, force: bool, inputs: Sequence[str | os.PathLike]) -> None:
    """Before any work: each output may be written (directory exists and is writable, no clobbering)."""
    from .cli_checks import cannot_create_error
    from .errors import ConvfactorError
    from .files.atomic import check_writable

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


def _report_path(out: Path) -> Path:
    return out.with_name(out.stem + ".report.json") if out.suffix else out.with_name(out.name + ".report.json")


# -- convert ------------------------------------------------------------------------------------
def _cmd_convert(args: argparse.Namespace, console: _Console) -> int:
    from . import __version__
    from .api import factorize, get_report
    from .auto.verify import FidelityWarning
    from .cli_checks import check_out_name
    from .errors import ConvfactorError
    from .files.architecture import parse_input_shape
    from .policy import Policy
    from .share import parse_share_spec, share_weights, sharing_report
    from .summary import render_summary, summarize

    # 1. everything that can be checked without loading the model
    policy = Policy.from_any(args.policy)
    shape = parse_input_shape(args.input_shape)
    out = Path(args.out)
    check_out_name(out)
    report_path = _report_path(out)
    onnx_path = Path(args.onnx) if args.onnx else None
    outputs = [out, report_path] + ([onnx_path] if onnx_path else [])
    _check_outputs(outputs, force=args.force, inputs=[args.checkpoint])
    thread_counts = _parse_threads(args.threads)
    _check_counts(args)
    score_options = _score_options(args)
    share = None if args.share_weights is None else parse_share_spec(args.share_weights)
    calibration = _load_inputs_file(args.calibration, "--calibration")
    check_inputs = _load_inputs_file(args.check_inputs, "--check-inputs")
    if check_inputs is not None and not args.check:
        raise ConvfactorError("--check-inputs is only used with --check")
    arch = _resolve_arch_option(args.arch, args.arch_args)

    # 2. the model, checked
    source = _load_source(args.checkpoint, arch, trust=args.trust_checkpoint, input_shape=shape, console=console)
    if source.kind == "factorized":
        raise ConvfactorError(f"{args.checkpoint} is already factorized; convert the original checkpoint instead "
                              f"(a plan cannot be stacked on another)")
    needs_shape = [why for why, needed in (("for a .pt2 output", out.suffix == ".pt2"), ("for --onnx", onnx_path),
                                           ("for --check", args.check), ("for --bench", args.bench),
                                           ("for --profile", args.profile)) if needed]
    if needs_shape:
        _require_shape(source, needs_shape[0])
    example = _example_input(source.model, source.input_shape) if source.input_shape else None

    # 3. the work
    console.status(f"factorizing with {len(policy.rules)} policy rule(s)")
    started = time.perf_counter()
    with warnings.catch_warnings():  # printed below as one line each
        warnings.simplefilter("ignore", FidelityWarning)
        fast = factorize(source.model, policy, example, fold_batchnorm=not args.no_fold_bn,
                         trace=not args.no_trace, leaf_modules=args.leaf_module,
                         concrete_args=dict(args.concrete_arg), progress=console.progress,
                         calibration=calibration)
    report = get_report(fast)
    for warning in report.all_warnings():
        console.status(f"warning: {warning}")
    floor = report.extra.get("fidelity_check")
    if share is not None:
        console.status(f"sharing weights ({args.share_weights})")
        fast = share_weights(fast, **share)
        if args.weight_bits == 32:  # the score counts the shared bits unless --weight-bits says otherwise
            score_options["weight_bits"] = round(sharing_report(fast).weight_bits(), 3)
    factorize_seconds = time.perf_counter() - started

    document: dict[str, Any] = {
        "convfactor_version": __version__,
        "command": "convert",
        "status": "ok",
        "input": source.describe(),
        "outputs": {"model": str(out), "report": str(report_path), "onnx": None if onnx_path is None
                    else str(onnx_path)},
        "factorize": report.to_dict(),
        "factorize_seconds": factorize_seconds,
        "share_weights": None if share is None else sharing_report(fast).to_dict(),
        "onnx": None,
        "fidelity": None,
        "bench": None,
    }
    with StagedOutputs(args.force) as staging, tempfile.TemporaryDirectory(prefix="convfactor-") as scratch:
        _stage_model(staging, out, fast, source, example, args, console)
        export, onnx_files, renamed = None, {}, {scratch: None}
        if onnx_path is not None:
            export, onnx_files["factorized"] = _stage_onnx(staging, onnx_path, fast, example, args, console)
            document["onnx"] = export
            renamed[str(onnx_files["factorized"])] = str(onnx_path)
        fidelity = None
        if args.check:
            fidelity = _run_fidelity(source.model, fast, source.input_shape, args, console, workdir=scratch,
                                     inputs=check_inputs)
            document["fidelity"] = fidelity.to_dict()
            if not fidelity.passed:
                document["status"] = f"fidelity check failed: {_failed_criteria(fidelity)}"
            elif floor is not None and not floor["passed"]:
                document["status"] = (f"output check failed: relative error {floor['rel_error']:.4g} "
                                      f"({floor['bound_source']})")
            # Its exports are reused by the benchmark: each model is exported once.
            onnx_files.update({role: Path(scratch) / f"{role}.onnx" for role in ("original", "factorized")})
        bench = None
        if args.bench:
            bench = _run_benchmark(onnx_files.get("original", source.model), onnx_files.get("factorized", fast),
                                   source.input_shape, thread_counts, args, console)
            document["bench"] = bench.to_dict()
        if args.profile:
            profile = _run_profile(source.model, fast, report, source.input_shape, args, console)
            document["profile"] = profile.to_dict()
            report.extra["layer_times"] = {row["layer"]: row for row in document["profile"]["layers"]}
            document["factorize"] = report.to_dict()
        document["summary"] = summarize(document, **score_options)
        document = _rename_paths(document, renamed)
        text = json.dumps(document, indent=2, default=str) + "\n"
        staging.write(report_path, lambda p: p.write_text(text, encoding="utf-8"))
        staging.commit()

    if args.json:
        console.document(document)
    else:
        console.result(report.format_table())
        console.result("")
        console.result(f"wrote {out}" + (" (torch.export program)" if out.suffix == ".pt2" else
                                         f" (reload: convfactor.load({str(out)!r}))") + f" and {report_path}")
        if export is not None:
            console.result(f"wrote {onnx_path}: opset {export['opset']}, exporter {export['exporter']}, "
                           f"{export['file_size'] / 1e6:.2f} MB")
        if fidelity is not None:
            console.result("")
            console.result(fidelity.render())
        if bench is not None:
            console.result("")
            console.result(bench.render())
        console.result("")
        console.result(render_summary(document["summary"]))
    if fidelity is not None and not fidelity.passed:
        console.error(f"fidelity check failed ({fidelity.verdict}): {_failed_criteria(fidelity)}; "
                      f"the files were written and {report_path} marks them failing")
        return EXIT_CHECK_FAILED
    if args.check and floor is not None and not floor["passed"]:
        console.error(f"output check failed: the result is outside the {floor['bound_source']} "
                      f"(see the warnings); the files were written and {report_path} marks them failing")
        return EXIT_CHECK_FAILED
    return EXIT_OK


def _stage_model(staging: StagedOutputs, out: Path, fast: Any, source: _Source, example: Any,
                 args: argparse.Namespace, console: _Console) -> None:
    import torch

    from .files.serialize import exported_program_bytes, factorized_payload

    if out.suffix == ".pt2":
        console.status(f"torch.export to {out}")
        data = exported_program_bytes(fast, example)
        staging.write(out, lambda p: p.write_bytes(data))
        return
    payload = factorized_payload(fast, arch=source.arch_record, input_shape=source.input_shape,
                                 leaf_modules=args.leaf_module)
    _verify_reload(payload, fast, example, source.arch, args.trust_checkpoint, console)
    staging.write(out, lambda p: torch.save(payload, p))


def _verify_reload(payload: dict[str, Any], fast: Any, example: Any, arch: Any, trust: bool,
                   console: _Console) -> None:
    """Rebuild the model from the payload as ``convfactor.load`` will, so a file that would not reload is
    never written (an architecture whose structure changes between builds, say). ``arch`` is the user's
    ``--arch`` (None: the input file named its architecture, and was already allowed to)."""
    import torch

    from .errors import CheckpointError
    from .files.serialize import rebuild

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


def _rename_paths(data: Any, renamed: dict[str, str | None]) -> Any:
    """``data`` with paths of temporary files replaced: staged files by their destination, scratch by None."""
    if isinstance(data, dict):
        return {k: _rename_paths(v, renamed) for k, v in data.items()}
    if isinstance(data, list):
        return [_rename_paths(v, renamed) for v in data]
    if isinstance(data, str):
        for old, new in renamed.items():
            if data == old or data.startswith(old + os.sep):
                return new
    return data


def _stage_onnx(staging: StagedOutputs, onnx_path: Path, model: Any, example: Any, args: argparse.Namespace,
                console: _Console) -> tuple[dict[str, Any], Path]:
    from .runtime.export import export_onnx

    console.status(f"exporting ONNX to {onnx_path}")
    staged = staging.path_for(onnx_path)
    result = export_onnx(model, example, staged, opset=args.opset, dynamic_batch=not args.static_batch,
                         exporter=args.exporter, force=True)
    info = result.to_dict()
    if hasattr(model, "convfactor_sharing"):  # shared weights: store codebook + uint8 indices
        from .share_onnx import pack_codebooks

        packed = pack_codebooks(staged)
        info["file_size"], info["packed_codebooks"] = packed.size_after, len(packed.packed)
    info["path"] = str(onnx_path)
    if result.external_data_path is not None:
        data_destination = onnx_path.with_name(result.external_data_path.name)
        staging.adopt(result.external_data_path, data_destination)
        info["external_data_path"] = str(data_destination)
    return info, staged


def _run_fidelity(original: Any, fast: Any, shape: Sequence[int], args: argparse.Namespace, console: _Console,
                  workdir: str | None = None, inputs: Any = None):
    from .runtime.fidelity import check_fidelity

    console.status("checking fidelity in onnxruntime")
    if inputs is not None and args.static_batch:  # a static-batch export takes batches of its own size
        batch = max(1, shape[0])
        inputs = [inputs[i:i + batch] for i in range(0, len(inputs) - batch + 1, batch)]
    return check_fidelity(original, fast, inputs, input_shape=None if inputs is not None else tuple(shape),
                          n_samples=args.check_samples,
                          max_rel_l2_error=args.max_rel_l2, min_cosine=args.min_cosine,
                          min_snr_db=args.min_snr_db, min_top1_agreement=args.min_top1, exporter=args.exporter,
                          workdir=workdir)


def _failed_criteria(fidelity: Any) -> str:
    failed = [f"{o.name}.{c.name} = {c.value:.4g} (needs {c.comparison} {c.threshold:g})"
              for o in fidelity.outputs for c in o.criteria if not c.passed]
    failed += [f"{c.model} export differs from its module (rel. L2 {c.rel_l2_error:.2e} > {c.tolerance:g})"
               for c in fidelity.export_checks if not c.passed]
    return "; ".join(failed) or fidelity.verdict


def _run_benchmark(original: Any, fast: Any, shape: Sequence[int], threads: list[int] | None,
                   args: argparse.Namespace, console: _Console):
    from .runtime.benchmarking import benchmark

    console.status("timing original and factorized in onnxruntime")
    return benchmark(original, fast, input_shape=tuple(shape), threads=threads, warmup=args.warmup,
                     repeats=args.repeats, min_time=args.min_time, progress=console.progress,
                     exporter=args.exporter)


def _run_profile(original: Any, fast: Any, report: Any, shape: Sequence[int], args: argparse.Namespace,
                 console: _Console):
    from .runtime.profiling import profile_layers

    console.status("profiling each layer in onnxruntime")
    # From the modules, not the ONNX files: modules give the most reliable layer names.
    return profile_layers(original, fast, input_shape=tuple(shape), exporter=args.exporter,
                          replaced=[d.name for d in report.replaced])


def _load_inputs_file(path: str | None, option: str):
    """A tensor of inputs from a .pt (torch.save, read with weights_only=True) or .npy file, or None."""
    if path is None:
        return None
    import numpy as np
    import torch

    from .cli_checks import inputs_file_error
    from .errors import ConvfactorError

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
    if not isinstance(data, torch.Tensor) or data.dim() < 2 or len(data) == 0:
        raise ConvfactorError(f"{option}: {path} must hold one tensor of inputs shaped (N, ...), "
                              f"got {type(data).__name__}")
    if not torch.isfinite(data).all():
        raise ConvfactorError(f"{option}: {path} contains NaN or Inf")
    return data.float()


def _parse_threads(text: str | None) -> list[int] | None:
    from .errors import ConvfactorError

    if text is None:
        return None
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or any(c < 1 for c in counts):
        raise ConvfactorError(f"--threads must be positive integers separated by commas, got {text!r}")
    return counts


def _check_counts(args: argparse.Namespace) -> None:
    from .errors import ConvfactorError

    if getattr(args, "check_samples", 1) < 1:
        raise ConvfactorError(f"--check-samples must be >= 1, got {args.check_samples}")
    if getattr(args, "warmup", 0) < 0 or getattr(args, "repeats", 1) < 1 or getattr(args, "min_time", 0) < 0:
        raise ConvfactorError("--warmup must be >= 0, --repeats >= 1 and --min-time >= 0")


# -- inspect ------------------------------------------------------------------------------------
def _cmd_inspect(args: argparse.Namespace, console: _Console) -> int:
    from .errors import ConvfactorError
    from .files.architecture import parse_input_shape
    from .methods import available_methods

    shape = parse_input_shape(args.input_shape)
    methods = available_methods()
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in methods]
        if unknown or not wanted:
            raise ConvfactorError(f"--methods: unknown method {unknown[0] if unknown else args.methods!r}; "
                                  f"known: {', '.join(methods)}")
        methods = wanted
    arch = _resolve_arch_option(args.arch, args.arch_args)
    source = _load_source(args.checkpoint, arch, trust=args.trust_checkpoint, input_shape=shape, console=console)
    if args.concrete_arg:  # the model was loaded here: its forward is ours to bind
        source.model.forward = functools.partial(source.model.forward, **dict(args.concrete_arg))
    x = _example_input(source.model, _require_shape(source, "to count MACs"))
    score_options = _score_options(args)
    console.status("computing spectra")
    table = inspect_layers(source.model, x, methods)
    table["challenge_score"] = _inspect_score(table, score_options)
    if args.json:
        console.document({"command": "inspect", "input": source.describe(), **table})
    else:
        console.result(format_inspect_table(table, wide=args.wide))
    return EXIT_OK


def _inspect_score(table: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    from .score import challenge_score

    return challenge_score(table["totals"]["params"], table["totals"]["layer_macs"], **options).to_dict()


def inspect_layers(model: Any, example: Any, methods: Sequence[str],
                   fractions: Sequence[float] = ENERGY_FRACTIONS) -> dict[str, Any]:
    """Per-layer facts of ``model`` as it is, and the energy each method keeps at a few ranks.

    Args:
        model: the network (every Conv1d/Conv2d/Linear is listed, stages of factorized layers included).
        example: an input tensor (batch first) for the output shapes and MACs.
        methods: method names to compute energies for.
        fractions: fractions of each method's full rank.
    Returns:
        ``{"input_shape", "fractions", "methods", "layers": [...], "totals": {...}}``; a layer's
        ``energy[method]`` is a list (one per fraction), ``None`` for a method without spectrum, or
        ``{"unsupported": reason}``.
    """
    from passes.annotate_shapes import layer_io_shapes

    from .costs import count_params, layer_macs
    from .errors import RankError
    from .geometry import LayerGeometry, layer_kind
    from .methods import get_method
    from .ranks import fraction_to_rank, kept_energy

    shapes = layer_io_shapes(model, (example,))
    rows = []
    for name, layer in model.named_modules():
        kind = layer_kind(layer)
        if kind is None:
            continue
        geo = LayerGeometry.of(layer)
        macs = layer_macs(layer, shapes[name][1]) if name in shapes else None
        energy: dict[str, Any] = {}
        for method_name in methods:
            method = get_method(method_name)
            reason = method.unsupported_reason(layer)
            if reason:
                energy[method_name] = {"unsupported": reason}
                continue
            try:
                spectra = method.spectra(layer)
            except (RankError, NotImplementedError):
                energy[method_name] = None
                continue
            full = method.full_rank(layer)
            fulls = full if isinstance(full, tuple) else (full,)
            energy[method_name] = [
                min(kept_energy(s, fraction_to_rank(f, r)) for s, r in zip(spectra, fulls)) for f in fractions
            ]
        rows.append({
            "name": name or "(model)",
            "type": kind,
            "in": geo.in_channels,
            "out": geo.out_channels,
            "kernel": list(geo.kernel) if kind != "Linear" else None,
            "stride": list(geo.stride) if kind != "Linear" else None,
            "groups": geo.groups,
            "output_shape": list(shapes[name][1]) if name in shapes else None,
            "params": count_params(layer),
            "macs": macs,
            "energy": energy,
        })
    total_macs = sum(r["macs"] or 0 for r in rows)
    for row in rows:
        row["macs_share"] = None if row["macs"] is None or not total_macs else row["macs"] / total_macs
    return {
        "input_shape": list(example.shape),
        "fractions": list(fractions),
        "methods": list(methods),
        "layers": rows,
        "totals": {"params": count_params(model), "layer_macs": total_macs, "layers": len(rows)},
    }


# -- export -------------------------------------------------------------------------------------
def _cmd_export(args: argparse.Namespace, console: _Console) -> int:
    from .files.architecture import parse_input_shape
    from .runtime.export import export_onnx

    shape = parse_input_shape(args.input_shape)
    onnx_path = Path(args.onnx)
    _check_outputs([onnx_path], force=args.force, inputs=[args.checkpoint])
    arch = _resolve_arch_option(args.arch, args.arch_args)
    source = _load_source(args.checkpoint, arch, trust=args.trust_checkpoint, input_shape=shape, console=console)
    x = _example_input(source.model, _require_shape(source, "to export"))
    console.status(f"exporting ONNX to {onnx_path}")
    result = export_onnx(source.model, x, onnx_path, opset=args.opset, dynamic_batch=not args.static_batch,
                         exporter=args.exporter, force=args.force)
    if args.json:
        console.document({"command": "export", "input": source.describe(), "onnx": result.to_dict()})
    else:
        console.result(str(result))
    return EXIT_OK


# -- bench --------------------------------------------------------------------------------------
def _cmd_bench(args: argparse.Namespace, console: _Console) -> int:
    from .files.architecture import parse_input_shape, resolve_arch, stored_architecture
    from .files.checkpoint import check_readable

    shape = parse_input_shape(args.input_shape)
    threads = _parse_threads(args.threads)
    _check_counts(args)
    check_readable(args.checkpoint)
    if args.baseline:
        check_readable(args.baseline, "baseline checkpoint")
    arch = _resolve_arch_option(args.arch, args.arch_args)
    baseline_arch = resolve_arch(args.baseline_arch) if args.baseline_arch else None
    source = _load_source(args.checkpoint, arch, trust=args.trust_checkpoint, input_shape=shape, console=console)
    x = _example_input(source.model, _require_shape(source, "to time the model"))
    document: dict[str, Any] = {"command": "bench", "input": source.describe(), "baseline": None}
    if args.baseline:
        if baseline_arch is None:
            baseline_arch = arch
            if baseline_arch is None and source.arch_record.get("factory"):
                baseline_arch = stored_architecture(source.arch_record, trusted=args.trust_checkpoint,
                                                    where=args.checkpoint)
        baseline = _load_source(args.baseline, baseline_arch, trust=args.trust_checkpoint, input_shape=None,
                                console=console, what="baseline checkpoint")
        _example_input(baseline.model, x.shape)
        document["baseline"] = baseline.describe()
        report = _run_benchmark(baseline.model, source.model, x.shape, threads, args, console)
        document["bench"] = report.to_dict()
        text = report.render().replace("original", "baseline").replace("factorized", "model")
    else:
        if source.kind == "factorized":
            note = ("a factorized checkpoint stores nothing of the original weights: timing it alone "
                    "(pass --baseline ORIGINAL to compare)")
        else:
            note = "no --baseline given: timing the model alone"
        console.status(f"note: {note}")
        document["note"] = note
        document["bench"] = _time_alone(source.model, x, threads, args, console)
        text = _format_alone(document["bench"]) + f"\nnote: {note}"
    if args.json:
        console.document(document)
    else:
        console.result(text)
    return EXIT_OK


def _time_alone(model: Any, example: Any, threads: list[int] | None, args: argparse.Namespace,
                console: _Console) -> dict[str, Any]:
    """One model's onnxruntime latency per thread setting (``benchmark`` needs two models)."""
    import onnxruntime

    from .runtime.benchmarking import TimingStats, available_cores, cpu_model
    from .runtime.sessions import make_session, prepare_onnx, session_feeds

    inputs = (example.detach().cpu().numpy(),)
    results = []
    with tempfile.TemporaryDirectory(prefix="convfactor-bench-") as scratch:
        console.status("exporting to ONNX for timing")
        prepared = prepare_onnx(model, example, scratch, "model", exporter=args.exporter)
        for count in threads or sorted({1, available_cores()}):
            session = make_session(prepared.path, threads=count)
            feeds = session_feeds(session, inputs)
            for _ in range(args.warmup):
                session.run(None, feeds)
            times, started = [], time.perf_counter()
            while len(times) < args.repeats or time.perf_counter() - started < args.min_time:
                start = time.perf_counter()
                session.run(None, feeds)
                times.append(time.perf_counter() - start)
            results.append({"threads": count, "model": TimingStats.of(times).to_dict()})
    return {"results": results, "input_shapes": [list(example.shape)], "warmup": args.warmup,
            "repeats": args.repeats, "min_time": args.min_time, "onnxruntime_version": onnxruntime.__version__,
            "cpu_model": cpu_model(), "available_cores": available_cores()}


def _format_alone(bench: dict[str, Any]) -> str:
    lines = [f"onnxruntime {bench['onnxruntime_version']} CPU; {bench['cpu_model']}, "
             f"{bench['available_cores']} cores available; input {bench['input_shapes'][0]}",
             f"{'threads':>7}  {'median ms':>10}  {'p10-p90 ms':>16}  runs"]
    for row in bench["results"]:
        stats = row["model"]
        lines.append(f"{row['threads']:>7}  {stats['median_ms']:>10.3f}  "
                     f"{stats['p10_ms']:>7.3f}-{stats['p90_ms']:<8.3f}  {stats['runs']}")
    return "\n".join(lines)


# -- methods ------------------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace, console: _Console) -> int:
    from .demo import run_demo
    from .errors import ConvfactorError

    try:
        budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        raise ConvfactorError(f"--budgets must be fractions separated by commas, got {args.budgets!r}") from None
    if args.threads < 1 or args.min_time < 0:
        raise ConvfactorError("--threads must be >= 1 and --min-time >= 0")
    if args.method != "auto":
        from .methods import get_method

        get_method(args.method)
    document = run_demo(args.model, budgets, args.out_dir, method=args.method, threads=args.threads,
                        min_time=args.min_time, plot=not args.no_plot, force=args.force,
                        progress=console.progress, say=console.result if not args.json else console.status)
    if args.json:
        console.document(document)
    return EXIT_OK


def _cmd_methods(args: argparse.Namespace, console: _Console) -> int:
    from .methods import available_methods, get_method

    rows = [{"name": name, "summary": get_method(name).summary, "rank_meaning": get_method(name).rank_meaning}
            for name in available_methods()]
    if args.json:
        console.document({"command": "methods", "methods": rows})
        return EXIT_OK
    width = max(len(r["name"]) for r in rows)
    lines = []
    for row in rows:
        lines.append(f"{row['name'].ljust(width)}  {row['summary']}")
        lines.append(f"{''.ljust(width)}  rank: {row['rank_meaning']}")
    lines.append("")
    lines.append("a policy's rank: an int (above), a list of ints (one per component), a fraction in (0, 1] of "
                 "the full rank, or energy=E (keep that share of the squared singular values)")
    console.result("\n".join(lines))
    return EXIT_OK
