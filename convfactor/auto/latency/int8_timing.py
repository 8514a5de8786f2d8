"""The latency model in int8: the graphs it times, quantized as ``quantize_onnx`` will quantize the result.

With ``LatencyOptions(int8=True)`` every one-layer graph and every whole model the latency model times is
first quantized by ``convfactor.runtime.quantize_onnx`` (static QDQ, per-channel weights, uint8 activations, the
same ``reduce_range`` choice), so that ranks are chosen for the int8 kernels that will run: their channel
blocking and their quantize/dequantize steps differ from the float kernels'. Activation ranges do not
change the time of a dense kernel, so the calibration batch is the timing input itself (standard-normal
for layers, the example inputs for whole models).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["quantized_for_timing"]


def quantized_for_timing(path: Path, inputs: Sequence[np.ndarray], *, preprocess: bool) -> Path:
    """``path`` quantized to int8 beside it (``NAME.int8.onnx``), calibrated on ``inputs`` (one batch).

    ``preprocess``: onnxruntime's pre-processing, as the deployed model gets it (whole models); one-layer
    graphs skip it (nothing to fold, and it costs more than the quantization itself).
    """
    from ...runtime.quantize import quantize_onnx

    target = path.with_name(path.stem + ".int8.onnx")
    batch = tuple(np.asarray(a.detach().cpu() if hasattr(a, "detach") else a, dtype=np.float32) for a in inputs)
    quantize_onnx(path, target, [batch], force=True, preprocess=preprocess)
    return target
