"""NudeNet 320n body-part detector (a YOLOv8n), brought in from ONNX with onnx2torch.

Weights: ``nudenet/320n.onnx`` shipped inside the nudenet package (YOLOv8n, 18 classes, 320x320
input). Its one output is YOLO-style ``[N, 4 + 18, 2100]``: rows 0-3 are box centre and size in
input pixels (norm in the thousands), rows 4-21 the class probabilities (sigmoid, in [0, 1]): boxes
and classes in one tensor, at scales 1000x apart. Preprocessing and post-processing follow the
package's ``NudeDetector``: pad the image to a square at the bottom/right with black, resize to 320,
RGB scaled to [0, 1]; a row is a candidate when its best class probability >= 0.2, then NMS at IoU
0.45 (the package calls ``cv2.dnn.NMSBoxes(..., 0.25, 0.45)``, which drops scores < 0.25).

Data: face scenes of ``facedata`` (real LFW faces on real photographs, the faces NudeNet calls
FACE_FEMALE / FACE_MALE) and scikit-image's and scikit-learn's people photographs. There is no
ground truth of NudeNet's 18 classes, so the metric is agreement with the original network:
detections of the factorized network matched one-to-one to the original's detections on held-out
images (same class, IoU >= 0.5), as F-score (precision, recall); the original scores 1.0.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image

from . import facedata

SIZE = 320
ONNX_FILE = ("nudenet", "320n.onnx")
SCORE, NMS_IOU = 0.25, 0.45
TOLERANCE = 0.1  # F-score against the original's detections: a drop of more than this is a broken task
PHOTOS = ("astronaut", "camera", "coffee", "chelsea")


def load():
    from .onnx_import import onnx_to_torch, package_file

    return onnx_to_torch(package_file(*ONNX_FILE), (1, 3, SIZE, SIZE))


def to_input(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, 320, 320) in [0, 1], padded to a square at the bottom/right."""
    side = max(image.shape[:2])
    square = np.zeros((side, side, 3), dtype=np.uint8)
    square[: image.shape[0], : image.shape[1]] = image
    resized = np.asarray(Image.fromarray(square).resize((SIZE, SIZE), Image.BILINEAR))
    return torch.from_numpy(resized.transpose(2, 0, 1).astype(np.float32) / 255.0)


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    order = list(np.argsort(-scores))
    keep = []
    while order:
        i = order.pop(0)
        keep.append(i)
        order = [j for j in order if facedata.iou(boxes[i], boxes[j]) <= threshold]
    return keep


def decode(output: np.ndarray) -> list[tuple]:
    """Detections (x0, y0, x1, y1, class) in input pixels from one ``[22, 2100]`` output."""
    rows = output.T
    scores = rows[:, 4:].max(axis=1)
    keep = scores >= SCORE
    rows, scores = rows[keep], scores[keep]
    classes = rows[:, 4:].argmax(axis=1)
    cx, cy, w, h = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return [(*boxes[i], int(classes[i])) for i in _nms(boxes, scores, NMS_IOU)]


@functools.cache
def images(split: str, count: int) -> torch.Tensor:
    """Face scenes (and, held out, the bundled photographs) as a (N, 3, 320, 320) batch."""
    scenes, _ = facedata.scenes(split, count, SIZE, seed=7)
    if split == "held_out":
        scenes = scenes + [facedata._image(name) for name in PHOTOS]
    else:
        scenes = scenes + [facedata._image(name) for name in ("sklearn:china.jpg", "page", "horse")]
    return torch.stack([to_input(img) for img in scenes])


def spec(quick: bool = False) -> dict:
    n_cal, n_eval = (12, 8) if quick else (48, 24)
    x_cal = images("calibration", n_cal)
    x_eval = images("held_out", n_eval)
    x_val = images("held_out", n_eval + 16)[-16:]  # further held-out scenes, not scored

    reference: dict = {}

    def detect(run) -> list[list[tuple]]:
        with torch.no_grad():
            out = torch.cat([run(x_eval[i:i + 4]) for i in range(0, len(x_eval), 4)]).numpy()
        return [decode(o) for o in out]

    def metric(run) -> dict:
        if "boxes" not in reference:
            reference["boxes"] = detect(load())
        found = facedata.match_fscore(detect(run), reference["boxes"], same=lambda p, g: p[4] == g[4])
        found["original_detections"] = sum(map(len, reference["boxes"]))
        return found

    return {
        "name": "nudenet_320n", "domain": "detection, YOLOv8n from ONNX (boxes + 18 classes in one tensor)",
        "source": "nudenet (320n.onnx) via onnx2torch", "build": load,
        "example": (x_eval[:1],), "calibration": x_cal, "validation": x_val, "metric": metric,
        "metric_key": "fscore", "higher_is_better": True, "tolerance": TOLERANCE,
        "metric_desc": "detections kept vs the original's (same class, IoU 0.5): F-score (precision, recall)",
        "outputs": {"names": ["boxes_and_classes"], "slices": {"boxes_and_classes": {"axis": 1, "box": [0, 4],
                                                                                    "classes": [4, 22]}}},
        "input_shape": (1, 3, SIZE, SIZE), "capture": {},
        "capture_fallback": {"trace": False},
    }
