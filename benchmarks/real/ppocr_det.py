"""PP-OCRv4 text detector (text detection), brought in from ONNX with onnx2torch.

Weights: ``ch_PP-OCRv4_det_infer.onnx`` shipped inside rapidocr-onnxruntime (a PP-LCNet backbone
with a DB head: a text-probability map at input resolution). Preprocessing as the package's
``DetPreProcess``: BGR, scaled to [-1, 1] (mean 0.5, std 0.5).

Metric: line-box F-score at IoU >= 0.5 (DB detects lines, CRAFT words) on the same kind of scenes
as CRAFT (``textdata``), with the
DB post-processing of the package's defaults made axis-aligned: probability > 0.3, a 2x2
dilation, connected components, mean probability >= 0.5 inside, then each box grown by
area x 1.6 / perimeter (the "unclip").
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from . import textdata

SIZE = 320
ONNX_FILE = ("rapidocr_onnxruntime", "models", "ch_PP-OCRv4_det_infer.onnx")


def load():
    from .onnx_import import onnx_to_torch, package_file

    return onnx_to_torch(package_file(*ONNX_FILE), (1, 3, SIZE, SIZE))


def to_input(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((image[:, :, ::-1].transpose(2, 0, 1) / 127.5 - 1.0).astype(np.float32))


def detect_boxes(prob: np.ndarray, thresh=0.3, box_thresh=0.5, unclip_ratio=1.6, min_size=3):
    """Axis-aligned DB boxes (x0, y0, x1, y1) from one (H, W) probability map."""
    mask = ndimage.binary_dilation(prob > thresh, structure=np.ones((2, 2)))
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
    boxes = []
    h_img, w_img = prob.shape
    for found in ndimage.find_objects(labels):
        if found is None:
            continue
        ys, xs = found
        w, h = xs.stop - xs.start, ys.stop - ys.start
        if min(w, h) < min_size or prob[found].mean() < box_thresh:
            continue
        grow = w * h * unclip_ratio / (2 * (w + h))
        boxes.append((max(0.0, xs.start - grow), max(0.0, ys.start - grow),
                      min(w_img, xs.stop + grow), min(h_img, ys.stop + grow)))
    return boxes


def spec(quick: bool = False) -> dict:
    n_eval, n_cal = (12, 16) if quick else (32, 32)
    x_eval, truth = textdata.scene_batch(n_eval, 31, SIZE, to_input, "lines")
    x_cal, _ = textdata.scene_batch(n_cal, 32, SIZE, to_input, "lines")
    metric = textdata.detection_metric(x_eval, truth, lambda out: detect_boxes(out[0]))

    return {
        "name": "ppocrv4_det", "domain": "text detection (from ONNX)",
        "source": "rapidocr-onnxruntime (ch_PP-OCRv4_det_infer.onnx) via onnx2torch", "build": load,
        "example": (x_eval[:1],), "calibration": x_cal, "metric": metric,
        "metric_key": "fscore", "higher_is_better": True,
        "metric_desc": "line-box F-score at IoU 0.5 (at IoU 0.7)",
        "input_shape": (1, 3, SIZE, SIZE), "capture": {},
        "capture_fallback": {"trace": False},
    }
