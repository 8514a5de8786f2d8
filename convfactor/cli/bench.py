"""``convfactor bench``: time a checkpoint or an ONNX file in onnxruntime, against a baseline when one is given.

With ``--baseline`` both models are timed in interleaved pairs (``convfactor.runtime.benchmark``); without one
the model is timed alone, per thread setting. Either side may be an ``.onnx`` file (an int8 model from
``convert --quantize int8``, any export; ``convfactor.cli.onnx_side``): it is timed as it is, and its input
shape is read from the graph where static (else ``--input-shape``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

from .console import EXIT_OK, Console
from .options import add_bench_arguments, add_model_arguments, add_output_arguments

__all__ = ["NAME", "HELP", "EXAMPLES", "add_arguments", "run"]

NAME = "bench"
HELP = "time a checkpoint (factorized or not) or an .onnx file in onnxruntime, against a baseline if given"
EXAMPLES = """\
examples:
  convfactor bench resnet_svd.pt --arch models:resnet20 --baseline resnet.pt
  convfactor bench resnet_svd.pt --arch models:resnet20 --threads 1 --repeats 100   # the model alone
  convfactor bench fast.int8.onnx --baseline original.onnx --input-shape 8,3,32,32   # ONNX files, int8 or float
  convfactor bench fast.int8.onnx --baseline resnet.pt --arch models:resnet20        # one of each

A factorized checkpoint stores nothing of the original weights, so without --baseline the model
is timed alone. The factory a factorized checkpoint names is used only with --trust-checkpoint;
otherwise give --arch.
"""


def add_arguments(bench: argparse.ArgumentParser) -> None:
    """The options of ``bench``."""
    add_model_arguments(bench)
    bench.add_argument("--baseline", metavar="CHECKPOINT2",
                       help="the model to compare against (e.g. the original): a checkpoint or an .onnx file")
    bench.add_argument("--baseline-arch", metavar="MODULE:FACTORY",
                       help="architecture of a state_dict baseline (default: --arch, or the factorized "
                            "checkpoint's stored architecture)")
    bench.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                       help="ONNX exporter (default: auto = dynamo, TorchScript if dynamo fails)")
    add_bench_arguments(bench)
    add_output_arguments(bench, force=False)


def run(args: argparse.Namespace, console: Console) -> int:
    """Run ``bench``; returns the exit code."""
    from ..files.architecture import parse_input_shape, resolve_arch, stored_architecture
    from ..files.checkpoint import check_readable
    from .checks import check_counts, parse_threads
    from .measure import run_benchmark
    from .onnx_side import is_onnx, read_onnx_side
    from .source import load_source, resolve_arch_option

    shape = parse_input_shape(args.input_shape)
    threads = parse_threads(args.threads)
    check_counts(args)
    check_readable(args.checkpoint)
    if args.baseline:
        check_readable(args.baseline, "baseline checkpoint")
    graphs = {"model": read_onnx_side(args.checkpoint, "CHECKPOINT") if is_onnx(args.checkpoint) else None,
              "baseline": read_onnx_side(args.baseline, "--baseline") if is_onnx(args.baseline) else None}
    _check_onnx_options(args, graphs, shape)
    arch = resolve_arch_option(args.arch, args.arch_args)
    baseline_arch = resolve_arch(args.baseline_arch) if args.baseline_arch else None
    source = baseline = None
    if graphs["model"] is None:
        source = load_source(args.checkpoint, arch, trust=args.trust_checkpoint, input_shape=shape, console=console)
    if args.baseline and graphs["baseline"] is None:
        if baseline_arch is None:
            baseline_arch = arch
            if baseline_arch is None and source is not None and source.arch_record.get("factory"):
                baseline_arch = stored_architecture(source.arch_record, trusted=args.trust_checkpoint,
                                                    where=args.checkpoint)
        baseline = load_source(args.baseline, baseline_arch, trust=args.trust_checkpoint,
                               input_shape=shape if source is None else None, console=console,
                               what="baseline checkpoint")
    x = _example(source, baseline, graphs, shape)
    model = graphs["model"].path if source is None else source.model
    document: dict[str, Any] = {"command": "bench",
                                "input": graphs["model"].describe() if source is None else source.describe(),
                                "baseline": None}
    if args.baseline:
        document["baseline"] = graphs["baseline"].describe() if baseline is None else baseline.describe()
        report = run_benchmark(graphs["baseline"].path if baseline is None else baseline.model, model, x.shape,
                               threads, args, console)
        document["bench"] = report.to_dict()
        text = report.render().replace("original", "baseline").replace("factorized", "model")
    else:
        if source is not None and source.kind == "factorized":
            note = ("a factorized checkpoint stores nothing of the original weights: timing it alone "
                    "(pass --baseline ORIGINAL to compare)")
        else:
            note = "no --baseline given: timing the model alone"
        console.status(f"note: {note}")
        document["note"] = note
        document["bench"] = _time_alone(model, x, threads, args, console)
        text = _format_alone(document["bench"]) + f"\nnote: {note}"
    if args.json:
        console.document(document)
    else:
        console.result(text)
    return EXIT_OK


def _check_onnx_options(args: argparse.Namespace, graphs: dict[str, Any], shape: Any) -> None:
    """Before loading anything: options that build a torch model refused where no side is a checkpoint, and
    ``--input-shape`` checked against the ONNX files' inputs."""
    from ..errors import ConvfactorError
    from .onnx_side import onnx_bench_shape

    if graphs["model"] is not None and (not args.baseline or graphs["baseline"] is not None):
        for flag, value in (("--arch", args.arch), ("--arch-args", args.arch_args),
                            ("--baseline-arch", args.baseline_arch)):
            if value:
                raise ConvfactorError(f"{flag}: not used when the models are ONNX files (they are timed as they are)")
    if graphs["baseline"] is not None and args.baseline_arch:
        raise ConvfactorError("--baseline-arch: not used when the baseline is an ONNX file")
    onnx = [g for g in graphs.values() if g is not None]
    if onnx and shape is not None:
        onnx_bench_shape(shape, onnx)


def _example(source: Any, baseline: Any, graphs: dict[str, Any], shape: Any) -> Any:
    """The timed batch: ``--input-shape``, else a checkpoint's declared shape, else an ONNX file's static one;
    checked against every side (each torch model runs on it, each ONNX input takes it)."""
    import torch

    from ..errors import ConvfactorError
    from ..input_checks import check_input_memory
    from .checks import example_input
    from .onnx_side import onnx_bench_shape

    modules = [side for side in (source, baseline) if side is not None]
    onnx = [g for g in graphs.values() if g is not None]
    shape = shape or next((side.input_shape for side in modules if side.input_shape is not None), None)
    if onnx:
        shape = onnx_bench_shape(shape, onnx)
    elif shape is None:
        raise ConvfactorError("--input-shape is required to time the model (the architecture declares no default), "
                              "e.g. --input-shape 1,3,224,224")
    if not modules:
        check_input_memory(shape, flag="--input-shape")
        return torch.zeros(shape)
    x = example_input(modules[0].model, shape)
    for side in modules[1:]:
        example_input(side.model, x.shape)
    return x


def _time_alone(model: Any, example: Any, threads: list[int] | None, args: argparse.Namespace,
                console: Console) -> dict[str, Any]:
    """One model's onnxruntime latency per thread setting (``benchmark`` needs two models)."""
    import onnxruntime

    from ..progress import phase
    from ..runtime.benchmarking import TimingStats, available_cores, cpu_model
    from ..runtime.sessions import make_session, prepare_onnx, session_feeds

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
            # No total: runs continue past --repeats until --min-time has passed.
            with phase(console.progress, f"timing, {count} thread(s)", unit="run") as bar:
                while len(times) < args.repeats or time.perf_counter() - started < args.min_time:
                    start = time.perf_counter()
                    session.run(None, feeds)
                    times.append(time.perf_counter() - start)
                    bar.update()
            results.append({"threads": count, "model": TimingStats.of(times).to_dict()})
    return {"results": results, "input_shapes": [list(example.shape)], "warmup": args.warmup,
            "repeats": args.repeats, "min_time": args.min_time, "onnxruntime_version": onnxruntime.__version__,
            "cpu_model": cpu_model(), "available_cores": available_cores()}


def _format_alone(bench: dict[str, Any]) -> str:
    """The text of ``_time_alone``'s result: the machine, then one row per thread setting."""
    from ..tables import format_grid

    stats = [row["model"] for row in bench["results"]]
    rows = [[str(row["threads"]), f"{s['median_ms']:.3f}", f"{s['p10_ms']:.3f}-{s['p90_ms']:.3f}", str(s["runs"])]
            for row, s in zip(bench["results"], stats)]
    return "\n".join([f"onnxruntime {bench['onnxruntime_version']} CPU; {bench['cpu_model']}, "
                      f"{bench['available_cores']} cores available; input {bench['input_shapes'][0]}"]
                     + format_grid(["threads", "median ms", "p10-p90 ms", "runs"], rows, left=0))
