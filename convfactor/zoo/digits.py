"""scikit-learn's bundled handwritten digits as a small, offline, CIFAR-shaped image data set.

``sklearn.datasets.load_digits`` ships 1797 8x8 grayscale images (pixel values 0..16, 10 classes)
inside the scikit-learn package, so nothing is downloaded. Each image is scaled to [0, 1],
upscaled to 32x32 (bilinear, ``align_corners=False``) and replicated to 3 channels, so the data
fits the standard CIFAR-shaped models (input ``(N, 3, 32, 32)``) unchanged. Images are then
normalized with the mean and std of the training split (one scalar each, all channels alike).

The split is stratified and fixed: per class, the indices are shuffled with
``numpy.random.default_rng(SPLIT_SEED)`` (PCG64, stable across numpy versions) and the first
share goes to the held-out set; class shares are rounded by largest remainder so the held-out set
has exactly ``TEST_SIZE`` = 450 images (train: 1347). It does not depend on scikit-learn's own
splitting code, whose algorithm may change between versions.

scikit-learn is an optional dependency (``pip install 'convfactor[examples]'``).

Example:
    >>> x, y = load_digits_split("test")
    >>> x.shape, y.shape
    (torch.Size([450, 3, 32, 32]), torch.Size([450]))
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConvfactorError

__all__ = [
    "IMAGE_SIZE",
    "CHANNELS",
    "NUM_CLASSES",
    "TEST_SIZE",
    "SPLIT_SEED",
    "split_indices",
    "load_digits_split",
    "calibration_subset",
]

IMAGE_SIZE = 32
CHANNELS = 3
NUM_CLASSES = 10
TEST_SIZE = 450
SPLIT_SEED = 0
_SPLITS = ("train", "test")


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 bundled images as (N, 8, 8) float64 in 0..16 and their (N,) int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConvfactorError(
            "the digits data set needs scikit-learn: pip install 'convfactor[examples]'"
        ) from None
    bunch = load_digits()
    return bunch.images.astype(np.float64), bunch.target.astype(np.int64)


def split_indices(labels: np.ndarray, test_size: int = TEST_SIZE, seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """A deterministic stratified split of sample indices into train and test.

    Args:
        labels: (N,) integer class labels.
        test_size: number of test samples, 0 < test_size < N.
        seed: seed of ``numpy.random.default_rng`` used to shuffle each class.
    Returns:
        ``{"train": indices, "test": indices}``, each sorted ascending, disjoint, covering 0..N-1.
    """
    labels = np.asarray(labels)
    if not 0 < test_size < len(labels):
        raise ConvfactorError(f"test_size must be in 1..{len(labels) - 1}, got {test_size}")
    classes, counts = np.unique(labels, return_counts=True)
    # Largest-remainder rounding: each class's share of test_size, summing to test_size exactly.
    ideal = counts * test_size / len(labels)
    per_class = np.floor(ideal).astype(np.int64)
    shortfall = test_size - int(per_class.sum())
    # Stable sort so ties between equal remainders go to the smaller class label.
    per_class[np.argsort(-(ideal - per_class), kind="stable")[:shortfall]] += 1
    rng = np.random.default_rng(seed)
    test_parts = []
    for cls, n_test in zip(classes, per_class):
        members = np.flatnonzero(labels == cls)
        test_parts.append(rng.permutation(members)[:n_test])
    test = np.sort(np.concatenate(test_parts))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return {"train": train, "test": test}


def _to_images(raw: np.ndarray) -> torch.Tensor:
    """(N, 8, 8) in 0..16 -> (N, CHANNELS, IMAGE_SIZE, IMAGE_SIZE) float32 in [0, 1]."""
    x = torch.from_numpy(raw / 16.0).to(torch.float32).unsqueeze(1)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.expand(-1, CHANNELS, -1, -1).contiguous()


@functools.lru_cache(maxsize=1)
def _normalized_splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    images, labels = _raw_digits()
    x_all = _to_images(images)
    indices = split_indices(labels)
    train = torch.from_numpy(indices["train"])
    # Statistics of the training split only, so the held-out images stay unseen.
    mean = x_all[train].mean()
    std = x_all[train].std()
    x_all = (x_all - mean) / std
    y_all = torch.from_numpy(labels)
    return {
        name: (x_all[torch.from_numpy(idx)].contiguous(), y_all[torch.from_numpy(idx)].contiguous())
        for name, idx in indices.items()
    }


def load_digits_split(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of one split of the digits data set.

    Args:
        split: ``"train"`` (1347 images) or ``"test"`` (450 held-out images).
    Returns:
        x: (N, 3, 32, 32) float32, normalized with the training split's mean and std;
        y: (N,) int64 labels 0..9. Fresh tensors: callers may modify them.
    """
    if split not in _SPLITS:
        raise ConvfactorError(f"unknown digits split {split!r}; expected one of {', '.join(_SPLITS)}")
    x, y = _normalized_splits()[split]
    return x.clone(), y.clone()


def calibration_subset(count: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-balanced sample of training images, e.g. for calibration or quick fidelity checks.

    Classes take turns (0, 1, ..., 9, 0, ...) so any ``count`` is as balanced as it can be; within a
    class, images are drawn without replacement in an order fixed by ``seed``.

    Args:
        count: number of images, 1..1347.
        seed: seed of ``numpy.random.default_rng`` for the order within each class.
    Returns:
        x: (count, 3, 32, 32) float32 and y: (count,) int64, from the training split.
    """
    x, y = load_digits_split("train")
    if not 1 <= count <= len(y):
        raise ConvfactorError(f"calibration count must be in 1..{len(y)}, got {count}")
    rng = np.random.default_rng(seed)
    labels = y.numpy()
    queues = [list(rng.permutation(np.flatnonzero(labels == cls))) for cls in range(NUM_CLASSES)]
    chosen: list[int] = []
    while len(chosen) < count:
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(int(queue.pop(0)))
    index = torch.tensor(chosen, dtype=torch.int64)
    return x[index], y[index]
