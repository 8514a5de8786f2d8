"""Why ``quantize_onnx`` uses 7-bit weights on x86 CPUs without VNNI: accuracy of int8 variants.

The digits ResNet-20 factorized as ``convfactor demo`` does at 0.5 of the MACs, quantized with
``quantize_onnx`` (static QDQ, 64 calibration images, uint8 activations) three ways: per-channel
weights in 8 bits, per-channel in 7 bits (``reduce_range=True``), per-tensor in 8 bits; each run in
onnxruntime with all graph optimizations (integer kernels) and with none (the QDQ graph computed in
float: what the quantization itself loses). Then dynamic quantization (no calibration data) timed
against the float model, batch 8, 1 thread. Also prints this CPU's VNNI/AMX flags.

    python benchmarks/int8_reduce_range.py
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import convfactor  # noqa: E402
from convfactor.demo import demo_options, demo_policy  # noqa: E402
from convfactor.runtime.quantize import needs_reduced_range  # noqa: E402
from convfactor.runtime.sessions import make_session, prepare_onnx  # noqa: E402
from convfactor.runtime.shared_timing import time_together  # noqa: E402
from convfactor.zoo import load_pretrained  # noqa: E402
from convfactor.zoo.digits import calibration_subset, load_digits_split  # noqa: E402


def accuracy(path: Path, x: torch.Tensor, y: torch.Tensor, optimization: str) -> float:
    session = make_session(path, threads=1, graph_optimization=optimization)
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return float((out.argmax(1) == y.numpy()).mean())


def main() -> None:
    torch.set_num_threads(1)
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    print("cpu flags:", [f for f in flags if "vnni" in f or "amx" in f or f.startswith("avx")],
          "-> reduce_range auto:", needs_reduced_range())
    model, _ = load_pretrained("resnet20_digits")
    x_cal, _ = calibration_subset(64)
    x, y = load_digits_split("test")
    fast = convfactor.factorize(model, demo_policy(0.5), x[:1], calibration=x_cal, auto_options=demo_options())
    with tempfile.TemporaryDirectory(prefix="convfactor-int8-range-") as d:
        float_path = prepare_onnx(fast, x[:1], d, "float").path
        print(f"float                         accuracy {accuracy(float_path, x, y, 'all'):.4f}")
        variants = {"per-channel, 8-bit weights": {"reduce_range": False},
                    "per-channel, 7-bit weights": {"reduce_range": True},
                    "per-tensor, 8-bit weights": {"reduce_range": False, "per_channel": False}}
        for name, options in variants.items():
            path = convfactor.runtime.quantize_onnx(float_path, Path(d) / "q.onnx", x_cal, force=True, **options).path
            print(f"{name:28s}  accuracy {accuracy(path, x, y, 'all'):.4f} (integer kernels), "
                  f"{accuracy(path, x, y, 'disabled'):.4f} (no graph optimization)")
        dynamic = convfactor.runtime.quantize_onnx(float_path, Path(d) / "dynamic.onnx").path
        print(f"dynamic                       accuracy {accuracy(dynamic, x, y, 'all'):.4f}")
        print("load average before timing", [round(v, 2) for v in os.getloadavg()])
        timing = time_together({"float": float_path, "dynamic": dynamic}, (8, 3, 32, 32), threads=1, min_time=3)
        print(f"batch 8, 1 thread: float {timing.stats['float'].median_ms:.3f} ms, dynamic "
              f"{timing.stats['dynamic'].median_ms:.3f} ms ({timing.speedup('dynamic'):.2f}x"
              f"{'' if timing.reliable('dynamic') else ', noisy'})")


if __name__ == "__main__":
    main()
