"""``convfactor sweep``: one checkpoint at several targets, measured; a table, a JSON, a PNG, the best model.

Checked before any work: the targets, the output files (none overwritten without ``--force``), the data
files, the metric, the executor options; then the model. Outputs are staged and published together.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

from .auto_options import add_fidelity_arguments, add_tuning_arguments, read_auto_options, with_fidelity_options
from .console import EXIT_OK, Console
from .options import add_model_arguments, add_output_arguments, positive_int, seconds
from .quantize_step import add_quantize_arguments

__all__ = ["NAME", "HELP", "EXAMPLES", "add_arguments", "run"]

NAME = "sweep"
HELP = "factorize one checkpoint at several targets and measure each (table, JSON, PNG, best model)"
EXAMPLES = """\
examples:
  # four MACs points and two latency points, held-out fidelity, speedups, the uniform baseline beside them
  convfactor sweep resnet.pt --arch models:resnet20 --calibration x.pt \\
      --targets macs=0.7,0.5,0.35,0.25 latency=0.8,0.6 --out sweep.json

  # the task metric, a bound, and the fastest model keeping it written out; two local worker processes
  convfactor sweep resnet.pt --arch models:resnet20 --calibration x.pt --metric mymetrics:accuracy \\
      --max-metric-drop 0.01 --targets macs=0.5,0.35,0.25 --out sweep.json --save-best best.pt --workers 2

  # each point and the original also in int8 (onnxruntime static QDQ), measured as their own points
  convfactor sweep resnet.pt --arch models:resnet20 --calibration x.pt --targets macs=0.5,0.35 \
      --quantize int8 --out sweep.json --save-best best.pt      # an int8 best: best.pt and best.int8.onnx

  # the tasks on a Dask cluster (pip install 'convfactor[distributed]')
  convfactor sweep resnet.pt --arch models:resnet20 --calibration x.pt --targets macs=0.5,0.3 \\
      --out sweep.json --scheduler tcp://10.0.0.5:8786

outputs: OUT (JSON: every point's held-out error per output, metric, measured speedup, allocation), the
plot (--plot, default OUT's stem + .png), --save-best (with --quantize, when the best point is an int8 one,
also BEST's stem + .int8.onnx: the int8 model measured). Nothing is written if any step fails.
exit codes: 0 ok, 2 bad input (nothing written).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``sweep``."""
    add_model_arguments(parser)
    parser.add_argument("--targets", nargs="+", required=True, metavar="KIND=F[,F...]",
                        help="the points: macs=0.7,0.5 params=0.3 latency=0.8,0.6 (fractions in (0, 1))")
    parser.add_argument("--policy", metavar="POLICY",
                        help="a .yaml/.json policy whose rules and fidelity every point shares (its target is "
                             "replaced per point); default: method auto on every layer")
    parser.add_argument("--calibration", metavar="INPUTS.pt",
                        help="real inputs (torch.save tensor or .npy): data-aware factors, sensitivities, and the "
                             "held-out samples every point is measured on")
    parser.add_argument("--out", required=True, metavar="SWEEP.json", help="the sweep's JSON")
    parser.add_argument("--plot", metavar="SWEEP.png", help="the PNG (default: OUT's stem + .png)")
    parser.add_argument("--save-best", metavar="BEST.pt",
                        help="write the fastest point within the bound (the policy's or --max-rel-error / "
                             "--max-metric-drop, else the default floor) as a factorized checkpoint; an int8 "
                             "point (--quantize) also as BEST.int8.onnx")
    parser.add_argument("--baseline", default="spatial_svd", metavar="METHOD",
                        help="the uniform weight-only baseline's method at each MACs point, or 'none' "
                             "(default spatial_svd)")
    group = parser.add_argument_group("fidelity and automatic policy")
    add_fidelity_arguments(group)
    add_tuning_arguments(group)
    timing = parser.add_argument_group("timing (onnxruntime, each point interleaved with the original)")
    timing.add_argument("--threads", type=positive_int, default=1, metavar="N", help="intra-op threads (default 1)")
    timing.add_argument("--min-time", type=seconds, default=1.0, metavar="S", help="seconds per point (default 1)")
    timing.add_argument("--repeats", type=positive_int, default=30, metavar="N", help="timed pairs (default 30)")
    timing.add_argument("--no-bench", action="store_true", help="do not time the points (no speedups, no plot)")
    add_quantize_arguments(parser, help="also quantize each point and the original with onnxruntime (static QDQ "
                                        "int8 calibrated on the fit and select samples of --calibration, dynamic "
                                        "without it) and measure them as their own points ('macs=0.5 int8', "
                                        "'original int8'), timed against the float original")
    tasks = parser.add_argument_group("where the tasks run (candidate scoring, probes, points)")
    tasks.add_argument("--workers", type=positive_int, metavar="N",
                       help="a local pool of N processes (at most the cores and what memory holds); default serial")
    tasks.add_argument("--scheduler", metavar="tcp://HOST:8786", help="a Dask distributed scheduler's address")
    add_output_arguments(parser, force=True)


def _check_arguments(args: argparse.Namespace) -> tuple[Any, Any, list[Path]]:
    """Everything checkable without the model: targets, methods, policy, outputs. Returns (targets, policy,
    outputs: out, plot, best, best's int8 file)."""
    from ..errors import ConvfactorError
    from ..methods import available_methods
    from ..policy import AUTO, Policy, Rule
    from ..sweeps.points import parse_targets
    from .checks import OUT_SUFFIXES
    from .outputs import check_outputs
    from .quantize_step import check_quantize_arguments, int8_path_for

    targets = parse_targets(args.targets, flag="--targets")
    check_quantize_arguments(args)
    if args.baseline != "none" and args.baseline not in available_methods():
        raise ConvfactorError(f"--baseline {args.baseline}: unknown method (known: none, "
                              f"{', '.join(sorted(available_methods()))})")
    if args.workers is not None and args.scheduler is not None:
        raise ConvfactorError("--workers and --scheduler: give one (a local pool or a Dask cluster)")
    if args.scheduler is not None and "://" not in args.scheduler:
        raise ConvfactorError(f"--scheduler {args.scheduler}: expected an address like tcp://host:8786")
    try:
        policy = Policy.from_any(args.policy) if args.policy is not None else Policy(rules=(Rule(method=AUTO,
                                                                                                 match="*"),))
    except ConvfactorError as error:
        raise type(error)(f"--policy: {error}") from None
    policy, _ = with_fidelity_options(policy, args)
    out = Path(args.out)
    if out.suffix.lower() != ".json":
        raise ConvfactorError(f"--out {out}: the sweep's results are JSON; the name must end in .json")
    plot = None if args.no_bench else Path(args.plot) if args.plot else out.with_suffix(".png")
    if plot is not None and plot.suffix.lower() != ".png":
        raise ConvfactorError(f"--plot {plot}: the name must end in .png")
    if args.plot and args.no_bench:
        raise ConvfactorError("--plot needs the speedups: drop --no-bench")
    best = Path(args.save_best) if args.save_best else None
    if best is not None and best.suffix.lower() not in OUT_SUFFIXES:
        raise ConvfactorError(f"--save-best {best}: the name must end in .pt or .pth (a factorized checkpoint for "
                              "convfactor.load) or .pt2 (a torch.export program)")
    best_int8 = int8_path_for(best, None) if best is not None and args.quantize else None
    outputs = [p for p in (out, plot, best, best_int8) if p is not None]
    check_outputs(outputs, force=args.force, inputs=[args.checkpoint, args.calibration, args.validation])
    return targets, policy, [out, plot, best, best_int8]


def run(args: argparse.Namespace, console: Console) -> int:
    """Run ``sweep``; returns the exit code."""
    from ..auto.search.verify import ConvfactorWarning
    from ..errors import ConvfactorError
    from ..executor import open_executor
    from ..files.architecture import parse_input_shape
    from ..files.atomic import StagedOutputs
    from ..metric import load_metric
    from ..sweeps import plot_sweep, sweep
    from ..sweeps.quantized import float_label
    from .checks import checked_inputs, example_input, load_inputs_file
    from .outputs import stage_model
    from .source import load_source, require_shape, resolve_arch_option

    # 1. everything that can be checked without loading the model
    targets, policy, (out, plot, best_path, best_int8) = _check_arguments(args)
    auto_options = read_auto_options(args)
    shape = parse_input_shape(args.input_shape)
    calibration = load_inputs_file(args.calibration, "--calibration")
    validation = load_inputs_file(args.validation, "--validation")
    metric = load_metric(args.metric) if args.metric else None
    if policy.fidelity is not None and policy.fidelity.needs_metric and metric is None:
        raise ConvfactorError("--max-metric-drop (or the policy's max_metric_drop/min_metric) needs --metric "
                              "MODULE:FUNCTION")
    if calibration is None and validation is None:
        console.status("note: without --calibration the points are chosen from the weights alone and measured on "
                       "the example input only; give real inputs for held-out fidelity")
    arch = resolve_arch_option(args.arch, args.arch_args)

    # 2. the model, checked
    source = load_source(args.checkpoint, arch, trust=args.trust_checkpoint, input_shape=shape, console=console)
    if source.kind == "factorized":
        raise ConvfactorError(f"{args.checkpoint} is already factorized; sweep the original checkpoint instead")
    require_shape(source, "for the sweep (MACs and timing)")
    example = example_input(source.model, source.input_shape)
    calibration = checked_inputs(source.model, calibration, "--calibration", args.calibration, example, console)
    validation = checked_inputs(source.model, validation, "--validation", args.validation, example, console)

    # 3. the work
    timed_int8 = bool(args.quantize) and any(t.kind == "latency" for t in targets)
    if timed_int8:  # as convert --quantize: ranks chosen for the kernels that will run
        console.status("note: the latency targets are timed on int8 graphs (--quantize int8)")
    console.status(f"sweeping {len(targets)} point(s): {', '.join(t.label for t in targets)}")
    model_bytes = sum(p.numel() * p.element_size() for p in source.model.parameters())
    bench = None if args.no_bench else {"threads": args.threads, "min_time": args.min_time,
                                        "repeats": args.repeats}
    with warnings.catch_warnings(), open_executor(args.workers, args.scheduler, model_bytes) as executor:
        warnings.simplefilter("ignore", ConvfactorWarning)  # each point's warnings are in the JSON
        result = sweep(source.model, targets, example, policy=policy, calibration=calibration,
                       validation=validation, metric=metric, auto_options=auto_options,
                       latency={"int8": True} if timed_int8 else None,
                       baseline=None if args.baseline == "none" else args.baseline,
                       bench={"skip": True} if bench is None else bench, executor=executor,
                       progress=console.progress, quantize=args.quantize,
                       quantize_options={"calibrate_method": args.calibrate_method,
                                         "keep_float": args.keep_float} if args.quantize else None)
    document = {"command": "sweep", "input": source.describe(), "targets": [t.label for t in targets],
                **result.to_dict(), "outputs": {"json": str(out), "plot": None if plot is None else str(plot),
                                                "best": None}}
    best = result.best()
    if best_path is not None and best is None:
        console.status(f"note: no point keeps the bound ({result.bound.get('text')}): --save-best writes nothing")
    with StagedOutputs(args.force) as staging:
        if best_path is not None and best is not None:
            stage_model(staging, best_path, result.models[float_label(best)], source, example,
                        argparse.Namespace(leaf_module=[], trust_checkpoint=args.trust_checkpoint), console)
            document["outputs"]["best"] = {"path": str(best_path), "point": best.label, "int8_onnx": None}
            if best.quantized:
                staging.write(best_int8, lambda p: result.models[best.label].save(p, force=True))
                document["outputs"]["best"]["int8_onnx"] = str(best_int8)
            elif best_int8 is not None and best_int8.exists():
                console.status(f"note: the best point is a float one; the older {best_int8} is left as it was")
        if plot is not None:
            staging.write(plot, lambda p: plot_sweep(result, p, title=f"{source.path.name}: convfactor sweep"))
        text = json.dumps(document, indent=2, default=str) + "\n"
        staging.write(out, lambda p: p.write_text(text, encoding="utf-8"))
        staging.commit()
    if args.json:
        console.document(document)
    else:
        console.result(result.table())
        console.result("")
        written = [str(out)] + ([str(plot)] if plot else []) + \
            ([f"{best_path} ({best.label})"] if best_path is not None and best is not None else []) + \
            ([str(best_int8)] if best_path is not None and best is not None and best.quantized else [])
        console.result(f"wrote {', '.join(written)}")
    return EXIT_OK
