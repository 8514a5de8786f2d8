"""Does a latency target land? Whole-network speedup against the request, and speedup per MAC cut.

For each network (random weights: latency only) and each latency target F (a 1/F speedup requested),
``factorize`` with ``{"rules": [{"types": ["Conv2d"], "method": M}], "target": {"latency": F}}`` in
onnxruntime at 1 thread (the latency model times each layer's candidates, unaligned and x16-aligned
ranks, then the whole candidate network is timed and the budget corrected, ``convfactor.auto.search.verify``).
The result is then timed again, independently (``convfactor.runtime.benchmarking``: interleaved pairs, median
ratio), and reported with its MAC reduction:

    efficiency = measured speedup / MAC reduction (1.0: every MAC cut turns into time)

    python benchmarks/latency_target.py                                  # ResNet-18 @224, 0.5 and 0.25
    python benchmarks/latency_target.py --nets resnet20 --targets 0.5    # a quick one
    python benchmarks/latency_target.py --profile                        # + per-layer times in both networks

Measured at main 3dd5103, one process per line, warm latency cache, load average 2.9 falling to 1.0:

    | policy                           | target | requested | speedup | MAC cut | efficiency | factorize s |
    |----------------------------------|--------|-----------|---------|---------|------------|-------------|
    | every Conv2d (no flags)          | 0.5    | 2.00x     | 2.06x   | 2.16x   | 0.96       | 29          |
    | every Conv2d                     | 0.25   | 4.00x     | 3.99x   | 4.74x   | 0.84       | 29          |
    | ``--skip conv1`` (stem left out) | 0.5    | 2.00x     | 2.05x   | 2.16x   | 0.95       | 35          |
    | ``--skip conv1``                 | 0.25   | 4.00x     | 4.12x   | 4.45x   | 0.93       | 41          |
    | ``--calibration 16``             | 0.5    | 2.00x     | 2.09x   | 2.10x   | 0.99       | 110         |
    | ``--calibration 16``             | 0.25   | 4.00x     | 4.07x   | 4.46x   | 0.91       | 107         |

Weight-only selection over every conv cuts the 3-channel stem to rank 1 at 4x (19.2x fewer MACs, 3.2x
less time), which is what the two control rows take out; README "Latency targets on ResNet-18" has the
per-layer profile behind it.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402

import convfactor  # noqa: E402
from convfactor.runtime.benchmarking import benchmark, cpu_model  # noqa: E402
from convfactor.zoo import MODELS, get_model  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="resnet18")
    parser.add_argument("--targets", default="0.5,0.25")
    parser.add_argument("--method", default="spatial_svd")
    parser.add_argument("--skip", default="",
                        help="comma-separated layer names left as they are (a control row, e.g. conv1: the stem)")
    parser.add_argument("--calibration", type=int, default=0,
                        help="this many random inputs as calibration data (a control row: measured sensitivities)")
    parser.add_argument("--cache", default=None, help="latency cache file (default: convfactor's)")
    parser.add_argument("--json", default=None, help="write the rows here too")
    parser.add_argument("--profile", action="store_true",
                        help="also print each replaced layer's time inside both networks (onnxruntime profiler)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    print(f"cpu: {cpu_model()}; onnxruntime 1 thread; method {args.method}")
    print("| network | latency target | requested | measured speedup | MACs cut | efficiency | factorize s |")
    print("|---|---|---|---|---|---|---|")
    for net in args.nets.split(","):
        model = get_model(net).eval()
        x = torch.randn(MODELS[net].input_shape)
        calibration = torch.randn(args.calibration, *x.shape[1:]) if args.calibration else None
        for target in (float(t) for t in args.targets.split(",")):
            skipped = [{"match": name, "method": "skip"} for name in args.skip.split(",") if name]
            policy = {"rules": [*skipped, {"types": ["Conv2d"], "method": args.method}], "target": {"latency": target}}
            started = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fast = convfactor.factorize(model, policy, x, calibration=calibration, progress=True,
                                            latency={"threads": 1, "cache": args.cache})
            seconds = time.perf_counter() - started
            report = convfactor.get_report(fast)
            speedup = benchmark(model, fast, x, threads=1, progress=False, min_time=3.0).results[0].speedup
            cut = 1 / report.macs_ratio
            row = {"net": net, "skip": args.skip, "calibration": args.calibration,
                   "target": target, "requested": 1 / target, "speedup": speedup, "macs_cut": cut,
                   "efficiency": speedup / cut, "seconds": seconds,
                   "search": report.extra["auto"].get("search"), "warnings": report.warnings}
            rows.append(row)
            print(f"| {net} | {target} | {1 / target:.2f}x | {speedup:.2f}x | {cut:.2f}x | {speedup / cut:.2f} "
                  f"| {seconds:.0f} |", flush=True)
            print(f"  probes (budget, measured time fraction): "
                  f"{[(p['budget'], p['fraction']) for p in (row['search'] or {}).get('probes', [])]}", flush=True)
            if args.profile:
                print_profile(model, fast, x, report)
            if args.json:
                with open(args.json, "w") as handle:
                    json.dump(rows, handle, indent=2, default=str)


def print_profile(model: torch.nn.Module, fast: torch.nn.Module, x: torch.Tensor, report) -> None:
    """Per replaced layer: the form chosen, its MAC cut, and its time inside each network (median of 30 runs)."""
    from convfactor.runtime.profiling import profile_layers

    layers = report.extra["auto"]["layers"]
    replaced = [name for name, layer in layers.items() if layer.get("chosen")]
    profile = profile_layers(model, fast, x, threads=1, exporter="torchscript", iterations=30, replaced=replaced)
    print("  | layer | form | MAC cut | ms in original | ms in factorized | time cut |")
    for row in profile.layers:
        if row.layer in replaced:
            chosen = layers[row.layer]["chosen"]
            cut = layers[row.layer]["original"]["macs"] / chosen["macs"]
            print(f"  | {row.layer} | {chosen['method']}:{chosen['rank']} | {cut:.2f}x | {row.original_ms:.3f} | "
                  f"{row.factorized_ms:.3f} | {row.original_ms / max(row.factorized_ms, 1e-9):.2f}x |")


if __name__ == "__main__":
    main()
