"""Does shift + pointwise run faster than the 3x3 conv it replaces in onnxruntime? One layer at a time.

For 3x3 convs of the shapes ResNet-20 (CIFAR, 32x32) and ResNet-18 (224x224) use, random weights, the
original layer and its ``shift`` replacement at m = 1, 2, 3 taps per channel are exported to ONNX
(torchscript) and timed in onnxruntime CPU, batch 1, graph optimizations ALL, interleaved; the speedup
is the median of per-pair ratios (original time / replacement time). MACs ratio: the 1x1 conv's MACs
over the 3x3 conv's (m / 9; the shift stage has none).

    python benchmarks/shift_layer_time.py                       # ~2 min
    python benchmarks/shift_layer_time.py --threads 2 --taps 1,2 --min-time 0.5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from convfactor.methods import get_method
from convfactor.runtime.benchmarking import available_cores, cpu_model
from convfactor.runtime.export import export_onnx
from convfactor.runtime.sessions import make_session

# (label, channels, spatial size, stride)
LAYERS = [
    ("resnet20 16@32", 16, 32, 1),
    ("resnet20 32@16", 32, 16, 1),
    ("resnet20 64@8", 64, 8, 1),
    ("resnet18 64@56", 64, 56, 1),
    ("resnet18 128@28", 128, 28, 1),
    ("resnet18 256@14", 256, 14, 1),
    ("resnet18 512@7", 512, 7, 1),
]


def time_pair(first, second, feed, min_time: float) -> float:
    """Median of per-round time(first) / time(second), rounds interleaved, for at least ``min_time`` s."""
    for session in (first, second):
        for _ in range(3):
            session.run(None, feed)
    ratios, started = [], time.perf_counter()
    while time.perf_counter() - started < min_time or len(ratios) < 10:
        t0 = time.perf_counter()
        first.run(None, feed)
        t1 = time.perf_counter()
        second.run(None, feed)
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
    return statistics.median(ratios)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--taps", default="1,2,3", help="m values (taps kept per input channel)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timed pairs per variant")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    shift = get_method("shift")
    print(f"# machine: {cpu_model()}, {available_cores()} cores; onnxruntime CPU, {args.threads} thread(s)",
          file=sys.stderr)
    print("| layer | m | MACs ratio | speedup |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, channels, size, stride in LAYERS:
            layer = nn.Conv2d(channels, channels, 3, stride, 1, bias=False).eval()
            x = torch.randn(1, channels, size, size)
            feed = {"input": x.numpy()}
            original = Path(tmp) / "original.onnx"
            export_onnx(layer, x, original, exporter="torchscript", force=True)
            base = make_session(original, threads=args.threads)
            for m in (int(v) for v in args.taps.split(",")):
                replaced = nn.Sequential(shift.decompose(layer, m)).eval()
                path = Path(tmp) / f"shift{m}.onnx"
                export_onnx(replaced, x, path, exporter="torchscript", force=True)
                speedup = time_pair(base, make_session(path, threads=args.threads), feed, args.min_time)
                print(f"| {label} | {m} | {m / 9:.3f} | {speedup:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
