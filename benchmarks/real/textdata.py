"""Text images with known ground truth, made from what packages bundle (nothing downloaded).

Words: the English text of scikit-learn's dataset descriptions (``sklearn/datasets/descr/*.rst``).
Backgrounds: scikit-learn's two sample photographs (``china.jpg``, ``flower.jpg``). Font: the
TrueType font Pillow bundles (``ImageFont.load_default(size)``). Every image is drawn with a seeded
generator, so the ground truth (strings, word boxes) is exact.
"""
from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont


@functools.lru_cache(maxsize=1)
def words() -> tuple[str, ...]:
    """Plain words (letters, digits, simple punctuation) from scikit-learn's dataset descriptions."""
    import sklearn.datasets

    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "descr")
    found: list[str] = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".rst"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                text = f.read()
            found += [w for w in re.findall(r"[A-Za-z0-9][A-Za-z0-9.,:%()'-]*", text)
                      if 2 <= len(w) <= 12 and not w.startswith(("http", "www"))]
    return tuple(found)


@functools.lru_cache(maxsize=1)
def photos() -> tuple[np.ndarray, ...]:
    """scikit-learn's bundled sample photographs, RGB uint8."""
    from sklearn.datasets import load_sample_images

    return tuple(load_sample_images().images)


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _background(rng: np.random.Generator, width: int, height: int, light: bool) -> Image.Image:
    """A random crop of a sample photo, washed out toward white (light) or black."""
    photo = photos()[int(rng.integers(len(photos())))]
    h, w = photo.shape[:2]
    scale = max(width / w, height / h) * rng.uniform(1.0, 2.0)
    img = Image.fromarray(photo).resize((int(w * scale) + 1, int(h * scale) + 1))
    x0 = int(rng.integers(0, img.width - width + 1))
    y0 = int(rng.integers(0, img.height - height + 1))
    crop = np.asarray(img.crop((x0, y0, x0 + width, y0 + height)), dtype=np.float32)
    wash = rng.uniform(0.45, 0.75)
    target = 255.0 if light else 0.0
    return Image.fromarray((crop * (1 - wash) + target * wash).clip(0, 255).astype(np.uint8))


def _ink(rng: np.random.Generator, light_background: bool) -> tuple[int, int, int]:
    base = rng.integers(0, 70, size=3) if light_background else rng.integers(190, 256, size=3)
    return tuple(int(v) for v in base)


def text_line(rng: np.random.Generator, height: int = 48, max_width: int = 320):
    """One line of 2-5 words on a photo background: (RGB uint8 array of height ``height`` and
    width <= ``max_width``, its text)."""
    vocab = words()
    light = bool(rng.random() < 0.7)
    for _ in range(100):
        text = " ".join(vocab[int(i)] for i in rng.integers(0, len(vocab), size=int(rng.integers(2, 6))))
        size = int(rng.integers(26, 38))
        font = _font(size)
        x0, y0, x1, y1 = font.getbbox(text)
        pad = int(rng.integers(3, 9))
        w, h = x1 - x0 + 2 * pad, y1 - y0 + 2 * pad
        if w * height / h <= max_width:
            break
    img = _background(rng, w, h, light)
    ImageDraw.Draw(img).text((pad - x0, pad - y0), text, font=font, fill=_ink(rng, light))
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    img = img.resize((max(8, round(w * height / h)), height), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0, rng.uniform(0, 8), size=arr.shape)
    return arr.clip(0, 255).astype(np.uint8), text


def text_scene(rng: np.random.Generator, size: int = 256, lines: int = 4):
    """A ``size``x``size`` photo crop with up to ``lines`` lines of words: (RGB uint8 array,
    word boxes, line boxes), boxes as (x0, y0, x1, y1) in pixels."""
    vocab = words()
    light = bool(rng.random() < 0.6)
    img = _background(rng, size, size, light)
    draw = ImageDraw.Draw(img)
    boxes: list[tuple[int, int, int, int]] = []
    line_boxes: list[tuple[int, int, int, int]] = []
    y = int(rng.integers(4, 20))
    for _ in range(lines):
        font = _font(int(rng.integers(18, 34)))
        x = int(rng.integers(4, 40))
        ink = _ink(rng, light)
        line_bottom, first = y, len(boxes)
        for _ in range(int(rng.integers(1, 4))):
            word = vocab[int(rng.integers(len(vocab)))]
            x0, y0, x1, y1 = draw.textbbox((x, y), word, font=font)
            if x1 > size - 4 or y1 > size - 4:
                break
            draw.text((x, y), word, font=font, fill=ink)
            boxes.append((x0, y0, x1, y1))
            line_bottom = max(line_bottom, y1)
            x = x1 + int(font.size * rng.uniform(0.3, 0.6))
        if len(boxes) > first:
            line = np.array(boxes[first:])
            line_boxes.append((int(line[:, 0].min()), int(line[:, 1].min()),
                               int(line[:, 2].max()), int(line[:, 3].max())))
        y = line_bottom + int(rng.integers(12, 40))
        if y > size - 30:
            break
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(0, 6), size=(size, size, 3))
    return arr.clip(0, 255).astype(np.uint8), boxes, line_boxes


def scene_batch(count: int, seed: int, size: int, to_input: Callable, truth: str = "words"):
    """``count`` text scenes as one input batch (each image through ``to_input``) and their ground-truth
    boxes per image: word boxes (``truth="words"``) or line boxes (``"lines"``)."""
    rng = np.random.default_rng(seed)
    made = [text_scene(rng, size) for _ in range(count)]
    boxes = [line_boxes if truth == "lines" else word_boxes for _, word_boxes, line_boxes in made]
    return torch.stack([to_input(img) for img, _, _ in made]), boxes


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_fscore(predicted: list[list], truth: list[list], iou: float = 0.5) -> dict:
    """Greedy one-to-one matching at IoU >= ``iou``, pooled over images."""
    hits = n_pred = n_true = 0
    for pred, gt in zip(predicted, truth):
        n_pred, n_true = n_pred + len(pred), n_true + len(gt)
        free = list(gt)
        for p in pred:
            scores = [_iou(p, g) for g in free]
            if scores and max(scores) >= iou:
                free.pop(int(np.argmax(scores)))
                hits += 1
    precision, recall = hits / max(1, n_pred), hits / max(1, n_true)
    f = 2 * precision * recall / max(1e-12, precision + recall)
    return {"fscore": f, "precision": precision, "recall": recall}


def detection_metric(x_eval, truth: list[list], detect: Callable) -> Callable:
    """The metric of a text detector: run it on ``x_eval`` in batches of 4, ``detect`` boxes in each output
    map, and score them against ``truth`` (F-score at IoU 0.5, and at 0.7 as ``fscore70``)."""
    def metric(run) -> dict:
        with torch.no_grad():
            maps = torch.cat([run(x_eval[i:i + 4]) for i in range(0, len(x_eval), 4)]).numpy()
        boxes = [detect(m) for m in maps]
        result = box_fscore(boxes, truth)
        result["fscore70"] = box_fscore(boxes, truth, iou=0.7)["fscore"]
        return result
    return metric


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def character_error_rate(predicted: list[str], truth: list[str]) -> float:
    """Total edit distance over total ground-truth characters."""
    return sum(edit_distance(p, t) for p, t in zip(predicted, truth)) / max(1, sum(map(len, truth)))
