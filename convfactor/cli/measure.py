"""Measuring a conversion from the command line: fidelity, latency and per-layer profile in onnxruntime.

Thin calls into ``convfactor.runtime`` (fidelity, benchmarking, profiling) with
the command's options, each announced on the console first.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from .console import Console

__all__ = ["run_fidelity", "failed_criteria", "run_benchmark", "run_profile"]


def run_fidelity(original: Any, fast: Any, shape: Sequence[int], args: argparse.Namespace, console: Console,
                 workdir: str | None = None, inputs: Any = None, spec: Any = None):
    """``check_fidelity`` with the ``--check-*`` tolerances (on ``inputs`` when given, else generated ones),
    measuring outputs as the policy's ``fidelity:`` declares them (``spec``: class scores, slices)."""
    from ..runtime.fidelity import check_fidelity

    console.status("checking fidelity in onnxruntime")
    if inputs is not None and args.static_batch:  # a static-batch export takes batches of its own size
        batch = max(1, shape[0])
        inputs = [inputs[i:i + batch] for i in range(0, len(inputs) - batch + 1, batch)]
    return check_fidelity(original, fast, inputs, input_shape=None if inputs is not None else tuple(shape),
                          n_samples=args.check_samples,
                          max_rel_l2_error=args.max_rel_l2, min_cosine=args.min_cosine,
                          min_snr_db=args.min_snr_db, min_top1_agreement=args.min_top1, exporter=args.exporter,
                          workdir=workdir, outputs=spec)


def failed_criteria(fidelity: Any) -> str:
    """The failed criteria of a fidelity report, as one line."""
    failed = [f"{o.name}.{c.name} = {c.value:.4g} (needs {c.comparison} {c.threshold:g})"
              for o in fidelity.outputs for c in o.criteria if not c.passed]
    failed += [f"{c.model} export differs from its module (rel. L2 {c.rel_l2_error:.2e} > {c.tolerance:g})"
               for c in fidelity.export_checks if not c.passed]
    return "; ".join(failed) or fidelity.verdict


def run_benchmark(original: Any, fast: Any, shape: Sequence[int], threads: list[int] | None,
                  args: argparse.Namespace, console: Console):
    """``benchmark`` with the latency options (``--threads``, ``--warmup``, ``--repeats``, ``--min-time``)."""
    from ..runtime.benchmarking import benchmark

    console.status("timing original and factorized in onnxruntime")
    return benchmark(original, fast, input_shape=tuple(shape), threads=threads, warmup=args.warmup,
                     repeats=args.repeats, min_time=args.min_time, progress=console.progress,
                     exporter=args.exporter)


def run_profile(original: Any, fast: Any, report: Any, shape: Sequence[int], args: argparse.Namespace,
                console: Console):
    """``profile_layers`` of both models, naming the replaced layers of ``report``."""
    from ..runtime.profiling import profile_layers

    console.status("profiling each layer in onnxruntime")
    # From the modules, not the ONNX files: modules give the most reliable layer names.
    return profile_layers(original, fast, input_shape=tuple(shape), exporter=args.exporter,
                          replaced=[d.name for d in report.replaced])

