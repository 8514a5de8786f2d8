"""MTCNN face detector (facenet-pytorch): P-Net and O-Net, each a multi-head network.

Weights: ``facenet_pytorch/data/{pnet,rnet,onet}.pt`` (state dicts), loaded into the package's own
``PNet``/``RNet``/``ONet`` classes. facenet-pytorch imports torchvision for ``batched_nms`` only;
torchvision does not import beside this repository's torch, so a stand-in module with a plain
``batched_nms`` is put in its place before the import (``_torchvision_stand_in``).

  * ``mtcnn_pnet``: the fully convolutional proposal network, two heads: box regression
    ``[N, 4, h, w]`` and face probability ``[N, 2, h, w]`` (softmax). Calibration: 64x64 crops of the
    image pyramid of calibration scenes, as P-Net sees them.
  * ``mtcnn_onet``: the output network on 48x48 candidates, three heads: box regression ``[N, 4]``,
    five landmarks ``[N, 10]`` and face probability ``[N, 2]``. Calibration: the candidates the
    original cascade hands to O-Net on calibration scenes.

Metric (both): faces found by the package's own cascade (``detect_face``: P-Net, R-Net, O-Net,
thresholds 0.6/0.7/0.7, minimum face 20 px, pyramid factor 0.709) with the network under test in
its stage and the originals in the others, scored against the true face boxes of held-out scenes
(``facedata``) at IoU >= 0.5: F-score, precision, recall and the count found.
"""
from __future__ import annotations

import functools
import sys
import types

import numpy as np
import torch

from . import facedata

THRESHOLDS = (0.6, 0.7, 0.7)
MIN_FACE, FACTOR = 20, 0.709
SIZE = 192
TOLERANCE = 0.05  # F-score drop (absolute) that still counts as the task kept


def _batched_nms(boxes, scores, idxs, iou_threshold):
    """torchvision.ops.batched_nms in plain torch (greedy, per index)."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64)
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    b = (boxes + offsets[:, None]).double()
    order = scores.argsort(descending=True)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    keep = []
    while order.numel():
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        xx1 = torch.maximum(b[i, 0], b[rest, 0])
        yy1 = torch.maximum(b[i, 1], b[rest, 1])
        xx2 = torch.minimum(b[i, 2], b[rest, 2])
        yy2 = torch.minimum(b[i, 3], b[rest, 3])
        inter = (xx2 - xx1).clamp_min(0) * (yy2 - yy1).clamp_min(0)
        overlap = inter / (area[i] + area[rest] - inter).clamp_min(1e-12)
        order = rest[overlap <= iou_threshold]
    return torch.tensor(keep, dtype=torch.int64)


def _torchvision_stand_in() -> None:
    """Modules facenet-pytorch imports from torchvision (``ops.boxes.batched_nms``,
    ``transforms.functional``), when torchvision itself is missing."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None and "torchvision" not in sys.modules:
        return
    from .onnx_import import _torchvision_placeholder

    _torchvision_placeholder()
    tv = sys.modules["torchvision"]
    boxes = types.ModuleType("torchvision.ops.boxes")
    boxes.batched_nms = _batched_nms
    tv.ops.boxes = boxes
    tv.ops.batched_nms = _batched_nms
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = types.ModuleType("torchvision.transforms.functional")
    tv.transforms = transforms
    sys.modules.update({"torchvision.ops.boxes": boxes, "torchvision.transforms": transforms,
                        "torchvision.transforms.functional": transforms.functional})


@functools.lru_cache(maxsize=1)
def _package():
    from .onnx_import import package_file

    package_file("facenet_pytorch", "data", "pnet.pt")  # a clear error when the package is missing
    _torchvision_stand_in()
    from facenet_pytorch.models import mtcnn
    from facenet_pytorch.models.utils import detect_face

    return mtcnn, detect_face


def networks() -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """P-Net, R-Net, O-Net with the package's weights, in eval mode."""
    mtcnn, _ = _package()
    return tuple(net(pretrained=True).eval() for net in (mtcnn.PNet, mtcnn.RNet, mtcnn.ONet))


def detect(images: list[np.ndarray], pnet, rnet, onet) -> list[list[tuple]]:
    """Face boxes (x0, y0, x1, y1) per image by the package's ``detect_face`` cascade."""
    _, detect_face = _package()
    out = []
    with torch.no_grad():
        for img in images:
            boxes, _ = detect_face.detect_face(img[None], MIN_FACE, pnet, rnet, onet, list(THRESHOLDS),
                                               FACTOR, "cpu")
            out.append([tuple(float(v) for v in b[:4]) for b in boxes[0]])
    return out


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - 127.5) * 0.0078125


def pnet_crops(images: list[np.ndarray], count: int, seed: int, crop: int = 64) -> torch.Tensor:
    """``count`` crops of ``crop`` x ``crop`` from the image pyramids of ``images`` (as P-Net sees
    them: area-resampled, scaled to [-1, 1])."""
    rng = np.random.default_rng(seed)
    levels = []
    for img in images:
        x = torch.as_tensor(img).permute(2, 0, 1)[None].float()
        h, w = x.shape[2:]
        scale, minl = 12.0 / MIN_FACE, min(h, w) * 12.0 / MIN_FACE
        while minl >= 12:
            size = (int(h * scale + 1), int(w * scale + 1))
            if min(size) >= crop:
                levels.append(_normalize(torch.nn.functional.interpolate(x, size=size, mode="area"))[0])
            scale, minl = scale * FACTOR, minl * FACTOR
    out = []
    for _ in range(count):
        level = levels[int(rng.integers(len(levels)))]
        y = int(rng.integers(level.shape[1] - crop + 1))
        x0 = int(rng.integers(level.shape[2] - crop + 1))
        out.append(level[:, y:y + crop, x0:x0 + crop])
    return torch.stack(out)


def onet_candidates(images: list[np.ndarray], limit: int) -> torch.Tensor:
    """The 48x48 inputs the original cascade hands to O-Net on ``images`` (at most ``limit``)."""
    pnet, rnet, onet = networks()
    seen: list[torch.Tensor] = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return onet(x)

    detect(images, pnet, rnet, Recorder())
    return torch.cat(seen)[:limit]


def _spec(which: str, quick: bool) -> dict:
    n_cal, n_eval = (8, 8) if quick else (24, 16)
    cal_images, _ = facedata.scenes("calibration", n_cal, SIZE)
    eval_images, truth = facedata.scenes("held_out", n_eval, SIZE)
    val_images, _ = facedata.scenes("held_out", n_eval, SIZE, seed=1)  # more held-out scenes, no truth needed
    pnet, rnet, onet = networks()

    if which == "pnet":
        calibration = pnet_crops(cal_images, 64 if quick else 192, seed=3)
        validation = pnet_crops(val_images, 64 if quick else 128, seed=4)
        level = int(SIZE * 12.0 / MIN_FACE + 1)
        first = torch.as_tensor(eval_images[0]).permute(2, 0, 1)[None].float()  # the first pyramid level
        example = (_normalize(torch.nn.functional.interpolate(first, size=(level, level), mode="area")),)
        build, stage = (lambda: networks()[0]), (lambda run: detect(eval_images, run, rnet, onet))
        outputs = {"names": ["box_regression", "face_probability"], "class_scores": ["face_probability"]}
    else:
        calibration = onet_candidates(cal_images, 256)
        validation = onet_candidates(val_images, 256)
        example = (calibration[:1],)
        build, stage = (lambda: networks()[2]), (lambda run: detect(eval_images, pnet, rnet, run))
        outputs = {"names": ["box_regression", "landmarks", "face_probability"],
                   "class_scores": ["face_probability"]}

    def metric(run) -> dict:
        return facedata.match_fscore(stage(run), truth)

    return {
        "name": f"mtcnn_{which}",
        "domain": f"face detection, MTCNN {which[0].upper()}-Net ({len(outputs['names'])} heads)",
        "source": f"facenet-pytorch (data/{which}.pt)", "build": build,
        "example": example, "calibration": calibration, "validation": validation, "metric": metric,
        "metric_key": "fscore", "higher_is_better": True, "tolerance": TOLERANCE,
        "metric_desc": "faces found at IoU 0.5 on held-out scenes: F-score (precision, recall, found/true)",
        "outputs": outputs, "input_shape": tuple(example[0].shape), "capture": {},
        "capture_fallback": {"trace": False},
    }


def spec_pnet(quick: bool = False) -> dict:
    return _spec("pnet", quick)


def spec_onet(quick: bool = False) -> dict:
    return _spec("onet", quick)
