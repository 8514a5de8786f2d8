"""uint8 or int8 activations, full-range or 7-bit weights: which int8 ResNet-20 runs fastest here.

The shipped digits ResNet-20 quantized four ways with ``convfactor.runtime.quantize_onnx`` (static QDQ,
per-channel int8 weights, 64 calibration images), timed together with the float model in rotating
rounds at 1 onnxruntime thread (``time_together``; speedup = float median / model median), batch 1 and 8.
The load average is printed before and after: the machine's 2 cores are shared.

    python benchmarks/int8_activation_types.py
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from convfactor.runtime.quantize import quantize_onnx  # noqa: E402
from convfactor.runtime.sessions import prepare_onnx  # noqa: E402
from convfactor.runtime.shared_timing import time_together  # noqa: E402
from convfactor.zoo import load_pretrained  # noqa: E402
from convfactor.zoo.digits import calibration_subset, load_digits_split  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    model, _ = load_pretrained("resnet20_digits")
    x_cal, _ = calibration_subset(64)
    x, _ = load_digits_split("test")
    with tempfile.TemporaryDirectory(prefix="convfactor-int8-types-") as d:
        paths = {"float": prepare_onnx(model, x[:1], d, "float").path}
        for activations in ("uint8", "int8"):
            for reduced in (True, False):
                name = f"{activations} act, {'7' if reduced else '8'}-bit w"
                paths[name] = quantize_onnx(paths["float"], Path(d) / f"{activations}_{reduced}.onnx", x_cal,
                                            activation_type=activations, reduce_range=reduced).path
        print("load average before", [round(v, 2) for v in os.getloadavg()])
        for batch in (1, 8):
            timing = time_together(paths, (batch, 3, 32, 32), threads=1, min_time=4)
            for name in timing.names:
                p10, p90 = timing.ratio_spread.get(name, (1.0, 1.0))
                print(f"batch {batch}  {name:22s} {timing.stats[name].median_ms:8.3f} ms  "
                      f"{timing.speedup(name):.2f}x ({p10:.2f}-{p90:.2f}){'' if timing.reliable(name) else ' noisy'}")
        print("load average after", [round(v, 2) for v in os.getloadavg()])


if __name__ == "__main__":
    main()
