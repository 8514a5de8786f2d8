"""``convert --quantize int8``: the int8 model staged with the other outputs, and four models measured.

The factorized model's float ONNX (the ``--onnx`` export, or one made in the scratch directory) is
quantized with ``convfactor.runtime.quantize_onnx``: static QDQ calibrated on ``--calibration`` when given,
dynamic otherwise (a note says so). The int8 file goes next to ``--onnx`` (or OUT) as ``NAME.int8.onnx``
and is published with the other outputs as one set.

A fidelity bound applies to the final artifact: when the policy has one (``fidelity:`` or
``--max-rel-error``/``--min-agreement``), the factorized int8 model is measured against the float original
(``check_fidelity`` on ONNX paths, its outputs measured as the bound declares them, on ``--check-inputs``,
else the calibration inputs, else generated ones; a task-metric bound is not measured on it, and a note
says so) and, when it breaks the bound, an accuracy warning says so and the float model stays the result:
the int8 file is not written.

With ``--check`` and ``--bench``, four models are compared: original, original int8, factorized,
factorized int8; fidelity against the float original with the ``--check`` tolerances (the float pair's
exit code is unchanged), latency timed together in rotating rounds (``time_together``: one original
timing shared by every row).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from .console import Console

__all__ = ["add_quantize_arguments", "check_quantize_arguments", "int8_path_for", "run_quantize"]

ROLES = ("original", "original_int8", "factorized", "factorized_int8")


CONVERT_HELP = ("also write NAME.int8.onnx next to --onnx (or OUT): static QDQ int8 calibrated on --calibration, "
                "dynamic without it; measured with --check/--bench against the original, original int8 and "
                "factorized models")


def add_quantize_arguments(parser: argparse.ArgumentParser, help: str = CONVERT_HELP) -> None:
    """``--quantize`` and its options (``help``: what ``--quantize`` does in this command)."""
    from ..runtime.quantize import CALIBRATE_METHODS, QUANTIZE_TYPES

    group = parser.add_argument_group("quantization (onnxruntime int8, after factorizing)")
    group.add_argument("--quantize", choices=QUANTIZE_TYPES, metavar="int8", help=help)
    group.add_argument("--calibrate-method", choices=CALIBRATE_METHODS,
                       help="activation ranges of static quantization (default minmax)")
    group.add_argument("--keep-float", action="extend", nargs="+", default=[], metavar="OP_OR_NODE",
                       help="op types (Gemm) or ONNX node names to leave in float")


def check_quantize_arguments(args: argparse.Namespace) -> None:
    """``--calibrate-method``/``--keep-float`` only with ``--quantize``.

    Raises:
        ConvfactorError: one of them given without ``--quantize``.
    """
    from ..errors import ConvfactorError

    if (args.calibrate_method or args.keep_float) and not args.quantize:
        raise ConvfactorError("--calibrate-method and --keep-float are only used with --quantize int8")


def int8_path_for(out: Path, onnx_path: Path | None) -> Path:
    """Where the int8 model goes: ``fast.onnx`` -> ``fast.int8.onnx`` (else OUT's stem, beside OUT)."""
    base = onnx_path if onnx_path is not None else out
    return base.with_name(f"{base.stem if base.suffix else base.name}.int8.onnx")


def run_quantize(*, staging: Any, int8_path: Path, source: Any, fast: Any, example: Any, onnx_files: dict[str, Path],
                 scratch: str, calibration: Any, check_inputs: Any, policy: Any, args: argparse.Namespace,
                 console: Console) -> dict[str, Any]:
    """Quantize, check the bound, stage the int8 file (or not), measure; returns the ``quantize`` section.

    ``onnx_files`` maps roles to float ONNX files already made (``factorized``, ``original``); missing
    ones are exported into ``scratch`` and added.
    """
    from ..runtime.quantize import quantize_onnx
    from ..runtime.sessions import prepare_onnx

    work = Path(scratch)
    bound = policy.fidelity
    needed = [("factorized", fast)] + ([("original", source.model)] if bound or args.check or args.bench else [])
    for role, model in needed:  # the original only to measure against
        if role not in onnx_files or not Path(onnx_files[role]).exists():
            onnx_files[role] = prepare_onnx(model, example, work, role, exporter=args.exporter).path
    options = {"per_channel": True, "calibrate_method": args.calibrate_method or "minmax",
               "keep_float": args.keep_float, "force": True}
    console.status("quantizing the factorized model to int8 (onnxruntime)"
                   + ("" if calibration is not None else ": no --calibration, dynamic quantization"))
    result = quantize_onnx(onnx_files["factorized"], work / "factorized.int8.onnx", calibration, **options)
    section: dict[str, Any] = {"result": "int8", "path": str(int8_path), "factorized": result.to_dict(),
                               "original": None, "bound_check": None, "fidelity": None, "latency": None,
                               "warnings": []}
    section["factorized"]["path"] = str(int8_path)
    for note in result.notes:
        console.status(f"note: {note}")
    inputs = check_inputs if check_inputs is not None else calibration
    if bound is not None and bound.needs_metric:
        section["warnings"].append("the task metric bound (--metric) is not measured on the int8 model: only the "
                                   "bound's output criteria are")
        console.status(f"note: {section['warnings'][-1]}")
    if bound is not None and (bound.max_rel_error is not None or bound.min_agreement is not None):
        section["bound_check"] = _bound_check(onnx_files["original"], result.path, bound, inputs, source, args, console)
        if not section["bound_check"]["passed"]:
            warning = (f"accuracy warning: the int8 model breaks the fidelity bound "
                       f"({section['bound_check']['failed']}); kept the float model as the result, "
                       f"{int8_path} not written" + (" (the older file there is left as it was)"
                                                      if int8_path.exists() else ""))
            section.update(result="float", path=None, warnings=[*section["warnings"], warning])
            section["factorized"]["path"] = None
            console.status(f"warning: {warning}")
    if section["result"] == "int8":
        staging.write(int8_path, lambda p: shutil.copyfile(result.path, p))
    if not (args.check or args.bench):
        return section
    console.status("quantizing the original to int8 for comparison")
    original = quantize_onnx(onnx_files["original"], work / "original.int8.onnx", calibration, **options)
    section["original"] = {**original.to_dict(), "path": None}
    files = {"original": onnx_files["original"], "original_int8": original.path,
             "factorized": onnx_files["factorized"], "factorized_int8": result.path}
    if args.check:
        section["fidelity"] = _four_fidelity(files, check_inputs, policy.fidelity, source, args, console)
        int8, float_ = section["fidelity"]["factorized_int8"], section["fidelity"]["factorized"]
        if float_["passed"] and not int8["passed"] and section["result"] == "int8":  # quantizing broke it
            section["warnings"].append(f"accuracy warning: {int8_path} fails the --check tolerances that the "
                                       f"float model meets ({int8['failed']})")
            console.status(f"warning: {section['warnings'][-1]}")
    if args.bench:
        section["latency"] = _four_latency(files, source.input_shape, args, console)
    return section


def _fidelity_inputs(inputs: Any, shape: tuple[int, ...], args: argparse.Namespace) -> Any:
    """A static-batch export takes batches of its own size: cut the inputs so (as ``run_fidelity`` does)."""
    if inputs is None or not args.static_batch:
        return inputs
    batch = max(1, shape[0])
    return [inputs[i:i + batch] for i in range(0, len(inputs) - batch + 1, batch)]


def _bound_check(original: Path, int8: Path, bound: Any, inputs: Any, source: Any, args: argparse.Namespace,
                 console: Console) -> dict[str, Any]:
    """The factorized int8 model against the float original, held to the policy's fidelity bound."""
    from ..runtime.fidelity import check_fidelity
    from .measure import failed_criteria

    console.status("checking the int8 model against the fidelity bound")
    shape = tuple(source.input_shape)
    report = check_fidelity(original, int8, _fidelity_inputs(inputs, shape, args),
                            input_shape=None if inputs is not None else shape, n_samples=args.check_samples,
                            max_rel_l2_error=bound.max_rel_error, min_top1_agreement=bound.min_agreement,
                            min_cosine=None, min_snr_db=None, min_top5_overlap=None, outputs=bound)
    data = "check inputs" if args.check_inputs else "calibration inputs" if inputs is not None else "generated inputs"
    return {"passed": report.passed, "bound": bound.to_dict(), "data": data,
            "failed": None if report.passed else failed_criteria(report), "report": report.to_dict()}


def _four_fidelity(files: dict[str, Path], inputs: Any, spec: Any, source: Any, args: argparse.Namespace,
                   console: Console) -> dict[str, Any]:
    """Each model against the float original with the ``--check`` tolerances (the original: itself), its
    outputs measured as the policy's ``fidelity:`` declares them (``spec``: class scores, slices)."""
    from ..runtime.fidelity import check_fidelity
    from .measure import failed_criteria

    console.status("checking original int8, factorized and factorized int8 against the original")
    shape = tuple(source.input_shape)
    out: dict[str, Any] = {}
    for role in ROLES[1:]:
        report = check_fidelity(files["original"], files[role], _fidelity_inputs(inputs, shape, args),
                                input_shape=None if inputs is not None else shape, n_samples=args.check_samples,
                                max_rel_l2_error=args.max_rel_l2, min_cosine=args.min_cosine,
                                min_snr_db=args.min_snr_db, min_top1_agreement=args.min_top1,
                                outputs=spec)
        out[role] = {"passed": report.passed, "verdict": report.verdict,
                     "failed": None if report.passed else failed_criteria(report), "report": report.to_dict()}
    return out


def _four_latency(files: dict[str, Path], shape: Any, args: argparse.Namespace, console: Console) -> list[dict]:
    """The four models timed together at each ``--threads`` count (default 1 and all cores)."""
    from ..runtime.benchmarking import available_cores
    from ..runtime.shared_timing import time_together
    from .checks import parse_threads

    counts = parse_threads(args.threads) or sorted({1, available_cores()})
    timings = []
    for threads in counts:
        console.status(f"timing the four models together in onnxruntime, {threads} thread(s)")
        shared = time_together(files, tuple(shape), threads=threads, warmup=args.warmup, repeats=args.repeats,
                               min_time=args.min_time)
        timings.append({"threads": threads, **shared.to_dict()})
    return timings
