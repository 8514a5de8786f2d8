"""``convfactor convert``: factorize a checkpoint, save it, and optionally export, check and time it.

The order is the command line's promise: everything that can be checked without the model first
(paths, outputs, policy, options), then the model (loaded, weights finite, input shape runs), then the
work. Outputs are staged and published together at the end, or not at all.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from .auto_options import add_fidelity_arguments, add_tuning_arguments, read_auto_options, with_fidelity_options
from .console import EXIT_CHECK_FAILED, EXIT_OK, Console
from .distill_options import add_distill_arguments, read_distill_options
from .options import (
    add_bench_arguments,
    add_check_arguments,
    add_concrete_arg_argument,
    add_model_arguments,
    add_onnx_arguments,
    add_output_arguments,
    add_score_arguments,
)
from .quantize_step import add_quantize_arguments
from .target_options import add_target_arguments

__all__ = ["NAME", "HELP", "EXAMPLES", "add_arguments", "run"]

NAME = "convert"
HELP = "factorize a checkpoint and save it (optionally ONNX, fidelity check, latency)"
EXAMPLES = """\
examples:
  # a state_dict + the function that builds its architecture (importable from the current directory)
  convfactor convert resnet.pt --arch models:resnet20 --policy spatial_svd:0.5 --out resnet_svd.pt

  # a model file by path, factory arguments as JSON, a YAML policy, ONNX + fidelity check + latency
  convfactor convert ckpt.pth --arch path/to/net.py:build --arch-args '{"num_classes": 100}' \\
      --policy policy.yaml --input-shape 1,3,224,224 --out net.pt --onnx net.onnx --check --bench

  # a torch.export program in, a torch.export program out
  convfactor convert model.pt2 --policy tucker2:energy=0.9 --out model_tucker.pt2

  # an automatic policy held to a fidelity bound, with more memory for the calibration statistics
  convfactor convert resnet.pt --arch models:resnet20 --policy auto.yaml --calibration x.pt \\
      --max-rel-error 0.05 --memory-budget 4GiB --out resnet_auto.pt

outputs: OUT (reload with convfactor.load(OUT), or a .pt2 program), OUT's stem + .report.json
(the full JSON report), --onnx, and with --quantize int8 NAME.int8.onnx next to --onnx (or OUT).
Nothing is written if any step fails.
exit codes: 0 ok, 1 --check failed (files written, report marks it), 2 bad input (nothing written),
3 nothing replaced (every layer skipped, the reasons on stderr; nothing written).
"""


def add_arguments(convert: argparse.ArgumentParser) -> None:
    """The options of ``convert``."""
    add_model_arguments(convert)
    convert.add_argument("--policy", metavar="POLICY",
                         help="a .yaml/.json policy file, or a method shorthand: spatial_svd, tucker2:0.5, "
                              "svd:energy=0.95 (every eligible layer); or give --method/--target")
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
    add_concrete_arg_argument(convert)
    _add_auto_arguments(convert)
    add_distill_arguments(convert)
    add_onnx_arguments(convert)
    add_check_arguments(convert)
    add_bench_arguments(convert)
    add_score_arguments(convert)
    add_quantize_arguments(convert)
    add_output_arguments(convert, force=True)


def _add_auto_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("automatic policy (a target, a fidelity bound, 'auto' rules or --calibration)")
    add_target_arguments(group)
    add_fidelity_arguments(group)
    add_tuning_arguments(group)


def run(args: argparse.Namespace, console: Console) -> int:
    """Run ``convert``; returns the exit code (1 when ``--check`` failed, files written)."""
    from .. import __version__
    from ..api import factorize, get_report
    from ..api_checks import check_leaf_modules, nothing_replaced_reason
    from ..auto.search.verify import ConvfactorWarning
    from ..costs import count_zeros
    from ..errors import ConvfactorError, NothingReplacedError
    from ..files.architecture import parse_input_shape
    from ..files.atomic import StagedOutputs
    from ..metric import load_metric
    from ..report import warning_line
    from ..share import parse_share_spec, share_weights, sharing_report
    from ..summary import summarize
    from ..target_outcome import target_outcome
    from .checks import (
        check_counts,
        check_onnx_name,
        check_out_name,
        checked_inputs,
        example_input,
        load_inputs_file,
        parse_threads,
    )
    from .measure import failed_criteria, run_benchmark, run_fidelity, run_profile
    from .options import read_score_options
    from .outputs import check_outputs, rename_paths, report_file_for, stage_model, stage_onnx
    from .quantize_step import check_quantize_arguments, int8_path_for, run_quantize
    from .source import load_source, require_shape, resolve_arch_option
    from .target_options import policy_from_options

    # 1. everything that can be checked without loading the model
    merged, policy_sources = policy_from_options(args)
    policy, fidelity_bound = with_fidelity_options(merged, args)
    auto_options = read_auto_options(args)
    shape = parse_input_shape(args.input_shape)
    out = Path(args.out)
    check_out_name(out)
    report_path = report_file_for(out)
    onnx_path = Path(args.onnx) if args.onnx else None
    check_onnx_name(onnx_path)
    int8_path = int8_path_for(out, onnx_path) if args.quantize else None
    outputs = [out, report_path] + [path for path in (onnx_path, int8_path) if path is not None]
    check_outputs(outputs, force=args.force, inputs=[args.checkpoint])
    thread_counts = parse_threads(args.threads)
    check_counts(args)
    score_options = read_score_options(args)
    share = None if args.share_weights is None else parse_share_spec(args.share_weights)
    calibration = load_inputs_file(args.calibration, "--calibration")
    validation = load_inputs_file(args.validation, "--validation")
    distill = read_distill_options(args, calibration, validation)
    metric = load_metric(args.metric, args.select_metric) if args.metric else None
    if policy.fidelity is not None and policy.fidelity.needs_metric and metric is None:
        raise ConvfactorError("--max-metric-drop (or the policy's max_metric_drop/min_metric) needs --metric "
                              "MODULE:FUNCTION")
    check_inputs = load_inputs_file(args.check_inputs, "--check-inputs")
    if check_inputs is not None and not args.check:
        raise ConvfactorError("--check-inputs is only used with --check")
    check_quantize_arguments(args)
    if auto_options is not None and not (
            policy.needs_resolution or calibration is not None or validation is not None or metric is not None):
        console.status("note: --memory-budget, --no-refit and --time-budget apply to an automatic policy (a target, "
                       "a fidelity bound, 'auto' rules or --calibration); this policy gives each layer's rank itself")
    arch = resolve_arch_option(args.arch, args.arch_args)

    # 2. the model, checked
    source = load_source(args.checkpoint, arch, trust=args.trust_checkpoint, input_shape=shape, console=console)
    if source.kind == "factorized":
        raise ConvfactorError(f"{args.checkpoint} is already factorized; convert the original checkpoint instead "
                              f"(a plan cannot be stacked on another)")
    needs_shape = [why for why, needed in (("for a .pt2 output", out.suffix == ".pt2"), ("for --onnx", onnx_path),
                                           ("for --check", args.check), ("for --bench", args.bench),
                                           ("for --profile", args.profile), ("for --quantize", args.quantize))
                  if needed]
    if needs_shape:
        require_shape(source, needs_shape[0])
    example = example_input(source.model, source.input_shape) if source.input_shape else None
    calibration = checked_inputs(source.model, calibration, "--calibration", args.calibration, example, console)
    validation = checked_inputs(source.model, validation, "--validation", args.validation, example, console)
    check_inputs = checked_inputs(source.model, check_inputs, "--check-inputs", args.check_inputs, example, console)
    check_leaf_modules(source.model, args.leaf_module, flag="--leaf-module")

    # 3. the work
    if args.quantize and policy.target is not None and policy.target[0] == "latency":
        console.status("note: the latency target is timed on int8 graphs (--quantize int8)")
    console.status(f"factorizing with {len(policy.rules)} policy rule(s)")
    started = time.perf_counter()
    with warnings.catch_warnings():  # printed below as one line each
        warnings.simplefilter("ignore", ConvfactorWarning)
        fast = factorize(source.model, policy, example, fold_batchnorm=not args.no_fold_bn,
                         trace=not args.no_trace, leaf_modules=args.leaf_module,
                         concrete_args=dict(args.concrete_arg), progress=console.progress,
                         calibration=calibration, validation=validation, metric=metric, auto_options=auto_options,
                         distill=distill,
                         latency={"int8": True} if args.quantize else None)  # timed as it will run
    report = get_report(fast)
    if nothing_replaced_reason(report):  # an unchanged copy is not what was asked: say why, write nothing
        raise NothingReplacedError(f"{nothing_replaced_reason(report)}; nothing written")
    for warning in report.all_warnings():
        console.status(warning_line(warning))
    floor = report.extra.get("fidelity_check")
    if share is not None:
        console.status(f"sharing weights ({args.share_weights})")
        fast = share_weights(fast, **share)
        report.zeros_after = count_zeros(fast)  # the produced model's: zeros take their nearest centroid
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
        **({"quantize": None} if args.quantize else {}),
        "factorize": report.to_dict(),
        "factorize_seconds": factorize_seconds,
        "share_weights": None if share is None else sharing_report(fast).to_dict(),
        "onnx": None,
        "fidelity": None,
        "bench": None,
    }
    if fidelity_bound is not None:
        document["fidelity_bound"] = fidelity_bound
    document["policy_from"] = policy_sources
    with StagedOutputs(args.force) as staging, tempfile.TemporaryDirectory(prefix="convfactor-") as scratch:
        stage_model(staging, out, fast, source, example, args, console)
        export, onnx_files, renamed = None, {}, {scratch: None}
        if onnx_path is not None:
            export, onnx_files["factorized"] = stage_onnx(staging, onnx_path, fast, example, args, console)
            document["onnx"] = export
            renamed[str(onnx_files["factorized"])] = str(onnx_path)
        fidelity = None
        if args.check:
            fidelity = run_fidelity(source.model, fast, source.input_shape, args, console, workdir=scratch,
                                    inputs=check_inputs, spec=policy.fidelity)
            document["fidelity"] = fidelity.to_dict()
            if not fidelity.passed:
                document["status"] = f"fidelity check failed: {failed_criteria(fidelity)}"
            elif floor is not None and not floor["passed"]:
                document["status"] = (f"output check failed: worst-slice relative error {floor['rel_error']:.4g} "
                                      f"({floor.get('worst')}) on {floor.get('data')} ({floor['bound_source']})")
            # Its exports are reused by the benchmark (each model exported once), unless they were made at the
            # --check-inputs' size and the benchmark times --input-shape's.
            if check_inputs is None or tuple(check_inputs.shape[1:]) == tuple(source.input_shape[1:]):
                onnx_files.update({role: Path(scratch) / f"{role}.onnx" for role in ("original", "factorized")})
        bench = None
        if args.bench:
            bench = run_benchmark(onnx_files.get("original", source.model), onnx_files.get("factorized", fast),
                                  source.input_shape, thread_counts, args, console)
            document["bench"] = bench.to_dict()
        if args.profile:
            profile = run_profile(source.model, fast, report, source.input_shape, args, console)
            document["profile"] = profile.to_dict()
            report.extra["layer_times"] = {row["layer"]: row for row in document["profile"]["layers"]}
            document["factorize"] = report.to_dict()
        if args.quantize:
            document["quantize"] = run_quantize(
                staging=staging, int8_path=int8_path, source=source, fast=fast, example=example,
                onnx_files=onnx_files, scratch=scratch, calibration=calibration, check_inputs=check_inputs,
                policy=policy, args=args, console=console)
            document["outputs"]["int8_onnx"] = document["quantize"]["path"]
        document["target"] = target_outcome(policy.target, policy_sources.get("target"), report, bench)
        document["summary"] = summarize(document, **score_options)
        document = rename_paths(document, renamed)
        text = json.dumps(document, indent=2, default=str) + "\n"
        staging.write(report_path, lambda p: p.write_text(text, encoding="utf-8"))
        staging.commit()

    if args.json:
        console.document(document)
    else:
        _print_results(console, report, document, out, report_path, onnx_path, export, fidelity, bench)
    if fidelity is not None and not fidelity.passed:
        console.error(f"fidelity check failed ({fidelity.verdict}): {failed_criteria(fidelity)}; "
                      f"the files were written and {report_path} marks them failing")
        return EXIT_CHECK_FAILED
    if args.check and floor is not None and not floor["passed"]:
        console.error(f"output check failed: the result is outside the {floor['bound_source']} "
                      f"(see the warnings); the files were written and {report_path} marks them failing")
        return EXIT_CHECK_FAILED
    return EXIT_OK


def _print_results(console: Console, report: Any, document: dict[str, Any], out: Path, report_path: Path,
                   onnx_path: Path | None, export: dict[str, Any] | None, fidelity: Any, bench: Any) -> None:
    """The text form: the per-layer table, what was written, the checks, the summary block."""
    from ..summary import render_summary

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
    if document.get("quantize"):
        from .quantize_render import render_quantize

        console.result("")
        console.result(render_quantize(document["quantize"]))
    console.result("")
    console.result(render_summary(document["summary"]))
