"""What each method buys in onnxruntime at ~2x and ~4x fewer conv MACs, measured side by side.

For a ResNet-18-shaped network at 224x224 and a CIFAR ResNet-20 at 32x32 (random weights: latency
only), every 3x3 conv but the stem is factorized with one method at the rank whose MACs come closest
to 1/2 (1/4) of that layer's. For each (network, method, reduction) it prints: the MAC ratio of the
factorized convs, the params ratio of the whole model, the measured onnxruntime speedup at 1 and 2
threads (original and factorized interleaved, median of per-pair ratios), the efficiency
(speedup x MAC ratio; 1.0 is the physical limit) and the export fidelity (relative L2 error of the
factorized model's ONNX output against PyTorch).

    python benchmarks/methods_speedup.py                  # both networks, all methods (~15 min)
    python benchmarks/methods_speedup.py --nets resnet20 --methods spatial_svd,tucker2 --min-time 0.5
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import convfactor
from convfactor.costs import per_layer_macs
from convfactor.runtime.benchmarking import available_cores, cpu_model
from convfactor.runtime.export import export_onnx
from convfactor.runtime.sessions import make_session
from convfactor.zoo import get_model
from passes.annotate_shapes import layer_io_shapes

NETS = {"resnet18": ("ResNet-18 @224", (1, 3, 224, 224)), "resnet20": ("ResNet-20 @32", (1, 3, 32, 32))}
METHODS = ("spatial_svd", "tucker2", "cp", "depthwise", "grouped")
FRACTIONS = np.unique(np.concatenate([np.linspace(0.01, 1.0, 100), [1 / 16, 1 / 8, 1 / 4, 1 / 2]]))


def target_layers(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Every 3x3 conv but the stem (the first conv), as in the measurements we compare with."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
             and m.groups == 1]
    return dict(convs[1:]) if convs and convs[0][0] in ("conv1", "stem.0") else dict(convs)


def rank_for_reduction(method, layer: nn.Conv2d, layer_input_shape, reduction: float):
    """The rank (over a grid of fractions) whose MACs are closest, in log ratio, to 1/reduction of the layer's.

    MACs are counted on the meta device, so no weights are decomposed while searching.
    """
    meta_layer = copy.deepcopy(layer).to("meta")
    x = torch.empty((1, *layer_input_shape[1:]), device="meta")
    original = sum(per_layer_macs(meta_layer, (x,)).values())
    best, best_gap = None, math.inf
    seen = set()
    for fraction in FRACTIONS:
        rank = method.resolve_rank(layer, float(fraction))
        if rank in seen:
            continue
        seen.add(rank)
        macs = sum(per_layer_macs(method.build(meta_layer, rank), (x,)).values())
        gap = abs(math.log(macs / original * reduction))
        if gap < best_gap:
            best, best_gap = rank, gap
    return best


def conv_macs(model: nn.Module, names, x) -> int:
    per_layer = per_layer_macs(model, (x,))
    return sum(v for k, v in per_layer.items() if any(k == n or k.startswith(n + ".") for n in names))


def export_error(model: nn.Module, path: Path, x: torch.Tensor) -> float:
    session = make_session(path, threads=1)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", default="resnet18,resnet20")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--reductions", default="2,4")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timed pairs per thread setting")
    parser.add_argument("--exporter", default="auto", choices=("auto", "dynamo", "torchscript"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    reductions = [float(r) for r in args.reductions.split(",")]
    rows = []
    print(f"# machine: {cpu_model()}, {available_cores()} cores; onnxruntime CPU; torch {torch.__version__}",
          file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        for net in args.nets.split(","):
            title, shape = NETS[net]
            model = get_model(net).eval()
            x = torch.randn(shape)
            layers = target_layers(model)
            io_shapes = layer_io_shapes(model, (x,))
            base_macs = conv_macs(model, layers, x)
            base_params = sum(p.numel() for p in model.parameters())
            original_onnx = Path(tmp) / f"{net}.onnx"
            export_onnx(model, x, original_onnx, exporter=args.exporter)
            for method_name in args.methods.split(","):
                method = convfactor.get_method(method_name)
                for reduction in reductions:
                    started = time.perf_counter()
                    rules = []
                    for name, layer in layers.items():
                        if method.unsupported_reason(layer):
                            continue
                        rank = rank_for_reduction(method, layer, io_shapes[name][0], reduction)
                        rules.append({"match": name, "method": method_name,
                                      "rank": list(rank) if isinstance(rank, tuple) else rank})
                    fast = convfactor.factorize(model, {"rules": rules}, x)
                    fast_onnx = Path(tmp) / f"{net}-{method_name}-{reduction:g}.onnx"
                    export_onnx(fast, x, fast_onnx, exporter=args.exporter)
                    bench = convfactor.runtime.benchmark(original_onnx, fast_onnx, input_shape=shape, threads=[1, 2],
                                                 min_time=args.min_time, progress=False)
                    speedups = {r.threads: r.speedup for r in bench.results}
                    mac_ratio = conv_macs(fast, layers, x) / base_macs
                    params_ratio = sum(p.numel() for p in fast.parameters()) / base_params
                    row = (title, method_name, reduction, 1 / mac_ratio, 1 / params_ratio, speedups[1], speedups[2],
                           speedups[1] * mac_ratio, export_error(fast, fast_onnx, x))
                    rows.append(row)
                    print(f"{title} {method_name} {reduction:g}x: done in {time.perf_counter() - started:.0f} s",
                          file=sys.stderr)
    print(f"Machine: {cpu_model()}, {available_cores()} cores available; onnxruntime "
          f"{bench.onnxruntime_version}, graph optimizations {bench.graph_optimization}, batch 1, fp32.\n")
    print("| network | method | target | conv MACs cut | params cut | speedup 1 thread | speedup 2 threads "
          "| efficiency (1 thread) | export rel. error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for title, method_name, reduction, macs_cut, params_cut, s1, s2, eff, err in rows:
        print(f"| {title} | {method_name} | {reduction:g}x | {macs_cut:.2f}x | {params_cut:.2f}x | {s1:.2f}x | "
              f"{s2:.2f}x | {eff:.2f} | {err:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
