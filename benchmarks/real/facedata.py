"""Face scenes with known face boxes, from images that ship inside scikit-image and scikit-learn.

Faces: the 100 face crops of scikit-image's ``lfw_subset`` (Labeled Faces in the Wild, 25x25 grey),
upscaled to 40-72 pixels and pasted on crops of real photographs (scikit-image's and scikit-learn's
bundled images). The first 50 faces and one set of backgrounds make the calibration scenes, the other
50 faces and other backgrounds the held-out scenes, so no face or background is in both. The held-out
set also holds two real photographs with one face each (scikit-image's ``astronaut`` and ``camera``),
their face boxes written down below.
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image

CAL_BACKGROUNDS = ("coffee", "chelsea", "brick", "grass", "sklearn:china.jpg")
HELD_OUT_BACKGROUNDS = ("rocket", "gravel", "hubble_deep_field", "immunohistochemistry", "sklearn:flower.jpg")
# (x0, y0, x1, y1) of the one face in each real photograph at its full size (512 x 512): the box the
# original MTCNN cascade finds there (benchmarks/real/mtcnn.py), rounded.
PHOTO_FACES = {"astronaut": (181, 62, 268, 172), "camera": (199, 119, 254, 192)}


@functools.cache
def _image(name: str) -> np.ndarray:
    """A bundled photograph as (H, W, 3) uint8 RGB."""
    if name.startswith("sklearn:"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(name.split(":", 1)[1])
    else:
        import skimage.data

        img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return np.ascontiguousarray(img[:, :, :3])


@functools.lru_cache(maxsize=1)
def _faces() -> np.ndarray:
    import skimage.data

    return skimage.data.lfw_subset()[:100]  # the first 100 are faces, the rest are not


def face_scene(rng: np.random.Generator, faces: np.ndarray, backgrounds: tuple[str, ...], size: int,
               count: int) -> tuple[np.ndarray, list[tuple]]:
    """One ``size`` x ``size`` RGB scene with ``count`` faces on a photo crop, and the face boxes."""
    photo = _image(backgrounds[int(rng.integers(len(backgrounds)))])
    scale = size / min(photo.shape[:2]) * rng.uniform(1.0, 1.6)
    photo = np.asarray(Image.fromarray(photo).resize(
        (max(size, int(photo.shape[1] * scale)), max(size, int(photo.shape[0] * scale))), Image.BILINEAR))
    y, x = int(rng.integers(photo.shape[0] - size + 1)), int(rng.integers(photo.shape[1] - size + 1))
    scene = photo[y:y + size, x:x + size].copy()
    boxes: list[tuple] = []
    for _ in range(200):
        if len(boxes) == count:
            break
        side = int(rng.integers(40, 73))
        x0, y0 = int(rng.integers(0, size - side)), int(rng.integers(0, size - side))
        box = (x0, y0, x0 + side, y0 + side)
        if any(not (box[2] + 4 <= b[0] or b[2] + 4 <= box[0] or box[3] + 4 <= b[1] or b[3] + 4 <= box[1])
               for b in boxes):
            continue
        face = faces[int(rng.integers(len(faces)))]
        face = np.asarray(Image.fromarray((face * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC))
        tint = rng.uniform(0.85, 1.15, size=3)
        scene[y0:y0 + side, x0:x0 + side] = np.clip(face[:, :, None] * tint, 0, 255).astype(np.uint8)
        boxes.append(box)
    return scene, boxes


def scenes(split: str, count: int, size: int = 192, seed: int = 0) -> tuple[list[np.ndarray], list[list]]:
    """``count`` face scenes of the split ('calibration' or 'held_out') and their face boxes; the
    held-out split ends with the two real photographs (resized to ``size``)."""
    faces = _faces()
    if split == "calibration":
        pool, backgrounds, base = faces[:50], CAL_BACKGROUNDS, 1000
    elif split == "held_out":
        pool, backgrounds, base = faces[50:], HELD_OUT_BACKGROUNDS, 2000
    else:
        raise ValueError(split)
    rng = np.random.default_rng(base + seed)
    images, truth = [], []
    for _ in range(count):
        img, boxes = face_scene(rng, pool, backgrounds, size, int(rng.integers(2, 5)))
        images.append(img)
        truth.append(boxes)
    if split == "held_out":
        for name, box in PHOTO_FACES.items():
            photo = _image(name)
            s = size / photo.shape[0]
            images.append(np.asarray(Image.fromarray(photo).resize((size, size), Image.BILINEAR)))
            truth.append([tuple(v * s for v in box)])
    return images, truth


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_fscore(predicted: list[list], truth: list[list], threshold: float = 0.5,
                 same=lambda p, g: True) -> dict:
    """Greedy one-to-one matching at IoU >= ``threshold`` (and ``same(p, g)``), pooled over images:
    F-score, precision, recall and the counts."""
    hits = n_pred = n_true = 0
    for pred, gt in zip(predicted, truth):
        n_pred, n_true = n_pred + len(pred), n_true + len(gt)
        free = list(gt)
        for p in pred:
            scores = [iou(p, g) if same(p, g) else 0.0 for g in free]
            if scores and max(scores) >= threshold:
                free.pop(int(np.argmax(scores)))
                hits += 1
    precision, recall = hits / max(1, n_pred), hits / max(1, n_true)
    f = 2 * precision * recall / max(1e-12, precision + recall)
    return {"fscore": f, "precision": precision, "recall": recall, "found": hits, "truth": n_true,
            "predicted": n_pred}
