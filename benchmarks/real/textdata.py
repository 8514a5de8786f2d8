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

import numpy as np
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
