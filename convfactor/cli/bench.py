"""``convfactor bench``: time a checkpoint in onnxruntime, against a baseline when one is given.

With ``--baseline`` both models are timed in interleaved pairs (``convfactor.runtime.benchmark``); without one
the model is timed alone, per thread setting.
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
HELP = "time a checkpoint (factorized or not) in onnxruntime, against a baseline if given"
EXAMPLES = """\
examples:
  convfactor bench resnet_svd.pt --arch models:resnet20 --baseline resnet.pt
  convfactor bench resnet_svd.pt --arch models:resnet20 --threads 1 --repeats 100   # the model alone

A factorized checkpoint stores nothing of the original weights, so without --baseline the model
is timed alone. The factory a factorized checkpoint names is used only with --trust-checkpoint;
otherwise give --arch.
"""


def add_arguments(bench: argparse.ArgumentParser) -> None:
    """The options of ``bench``."""
    add_model_arguments(bench)
    bench.add_argument("--baseline", metavar="CHECKPOINT2", help="the model to compare against (e.g. the original)")
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
    from .checks import check_counts, example_input, parse_threads
    from .measure import run_benchmark
    from .source import load_source, require_shape, resolve_arch_option

    shape = parse_input_shape(args.input_shape)
    threads = parse_threads(args.threads)
    check_counts(args)
    check_readable(args.checkpoint)
    if args.baseline:
        check_readable(args.baseline, "baseline checkpoint")
    arch = resolve_arch_option(args.arch, args.arch_args)
    baseline_arch = resolve_arch(args.baseline_arch) if args.baseline_arch else None
    source = load_source(args.checkpoint, arch, trust=args.trust_checkpoint, input_shape=shape, console=console)
    x = example_input(source.model, require_shape(source, "to time the model"))
    document: dict[str, Any] = {"command": "bench", "input": source.describe(), "baseline": None}
    if args.baseline:
        if baseline_arch is None:
            baseline_arch = arch
            if baseline_arch is None and source.arch_record.get("factory"):
                baseline_arch = stored_architecture(source.arch_record, trusted=args.trust_checkpoint,
                                                    where=args.checkpoint)
        baseline = load_source(args.baseline, baseline_arch, trust=args.trust_checkpoint, input_shape=None,
                               console=console, what="baseline checkpoint")
        example_input(baseline.model, x.shape)
        document["baseline"] = baseline.describe()
        report = run_benchmark(baseline.model, source.model, x.shape, threads, args, console)
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
