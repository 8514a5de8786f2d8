"""Built-in reference models, and the small trained checkpoints shipped with convfactor.

``MODELS`` lists every architecture by name with a one-line description, its factory as
``"module:function"`` (the form the CLI's ``--arch`` takes) and its default input shape.
``get_model(name, **kwargs)`` builds one with random weights; the keyword arguments are the
factory's own (``num_classes``, ``in_channels``, and ``width`` for MobileNet).

``PRETRAINED`` lists the checkpoints in ``convfactor/data/``, trained on scikit-learn's digits by
``examples/train_digits.py``; ``load_pretrained(name)`` returns the model in eval mode and its
metadata. Checkpoints are plain float32 state_dicts read with ``torch.load(weights_only=True)``.

Example:
    >>> model, meta = load_pretrained("resnet20_digits")
    >>> meta["heldout_accuracy"] >= 0.95
    True
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConvfactorError

__all__ = [
    "ModelSpec",
    "MODELS",
    "PRETRAINED",
    "UnknownModelError",
    "import_factory",
    "get_model",
    "pretrained_dir",
    "load_pretrained",
    "evaluate_accuracy",
]


class UnknownModelError(ConvfactorError, KeyError):
    """A model or checkpoint name is not in the zoo."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ModelSpec:
    """One architecture of the zoo.

    Attributes:
        name: registry name, e.g. ``"resnet20"``.
        factory: ``"module:function"`` building it, e.g. ``"convfactor.zoo.resnet:resnet20"``.
        description: one line for listings.
        input_shape: default input shape, batch 1, e.g. ``(1, 3, 32, 32)``.
    """

    name: str
    factory: str
    description: str
    input_shape: tuple[int, ...]


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "resnet20",
            "convfactor.zoo.resnet:resnet20",
            "CIFAR ResNet-20: 3x3 BasicBlocks, 16/32/64 channels, 1x1 projection shortcuts",
            (1, 3, 32, 32),
        ),
        ModelSpec(
            "resnet18",
            "convfactor.zoo.resnet:resnet18",
            "ImageNet ResNet-18: 7x7/2 stem + max-pool, 64..512 channels (benchmarking shape)",
            (1, 3, 224, 224),
        ),
        ModelSpec(
            "resnet18_cifar",
            "convfactor.zoo.resnet:resnet18_cifar",
            "ResNet-18 with a 3x3 stem and no max-pool, 64..512 channels, for 32x32 inputs",
            (1, 3, 32, 32),
        ),
        ModelSpec(
            "mobilenet_cifar",
            "convfactor.zoo.mobilenet:mobilenet_cifar",
            "MobileNet-v1-style: depthwise 3x3 + pointwise 1x1 blocks and two regular 3x3 convs",
            (1, 3, 32, 32),
        ),
    )
}

# Checkpoint name -> registry name of its architecture.
PRETRAINED: dict[str, str] = {
    "resnet20_digits": "resnet20",
    "mobilenet_digits": "mobilenet_cifar",
}


def import_factory(spec: str) -> Callable[..., nn.Module]:
    """Resolve ``"package.module:function"`` to the callable it names.

    Args:
        spec: module path and attribute separated by one colon.
    Returns:
        The callable.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConvfactorError(f"factory must look like 'package.module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as missing:
        raise ConvfactorError(f"cannot import module {module_name!r} for factory {spec!r}: {missing}") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ConvfactorError(f"{module_name!r} has no callable {attribute!r}")
    return factory


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a zoo architecture with random weights.

    Args:
        name: a key of ``MODELS``.
        **kwargs: the factory's arguments (``num_classes``, ``in_channels``; MobileNet: ``width``).
    Returns:
        The model, in training mode.
    """
    if name not in MODELS:
        raise UnknownModelError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    factory = import_factory(MODELS[name].factory)
    try:
        return factory(**kwargs)
    except TypeError as bad:  # an unknown keyword: say which model and which arguments it takes
        raise ConvfactorError(f"{name}: {bad}") from None


def pretrained_dir() -> Path:
    """The directory holding the shipped checkpoints (``convfactor/data``)."""
    return Path(str(resources.files("convfactor") / "data"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_pretrained(name: str, directory: str | Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a trained checkpoint and its metadata.

    Args:
        name: a key of ``PRETRAINED``, e.g. ``"resnet20_digits"``.
        directory: where ``<name>.pt`` and ``<name>.json`` lie; default: the shipped ones.
    Returns:
        model: the architecture with the trained weights, in eval mode;
        metadata: the JSON metadata (factory, kwargs, input_shape, heldout_accuracy, ...).
    """
    if name not in PRETRAINED:
        raise UnknownModelError(f"unknown pretrained model {name!r}; available: {', '.join(PRETRAINED)}")
    folder = Path(directory) if directory is not None else pretrained_dir()
    meta_path, weights_path = folder / f"{name}.json", folder / f"{name}.pt"
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"missing checkpoint file {path}")
    try:
        metadata = json.loads(meta_path.read_text())
    except json.JSONDecodeError as bad:
        raise CheckpointError(f"{meta_path} is not valid JSON: {bad}") from None
    if metadata.get("sha256") != _sha256(weights_path):
        raise CheckpointError(f"{weights_path} does not match the sha256 recorded in {meta_path.name}")
    architecture = PRETRAINED[name]
    if metadata.get("factory") != MODELS[architecture].factory:
        raise CheckpointError(f"{meta_path.name} names factory {metadata.get('factory')!r}, expected "
                              f"{MODELS[architecture].factory!r}")
    model = get_model(architecture, **metadata.get("kwargs", {}))
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, ValueError, OSError) as bad:
        first_line = str(bad).strip().splitlines()[0] if str(bad).strip() else type(bad).__name__
        raise CheckpointError(f"cannot load {weights_path}: {first_line}") from None
    return model.eval(), metadata


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``, evaluated in eval mode (the mode is restored after).

    Args:
        model: a classifier returning (N, num_classes) logits.
        x: (N, ...) inputs.
        y: (N,) integer labels.
        batch_size: inputs per forward pass.
    Returns:
        The fraction of correct predictions, in [0, 1].
    """
    if len(x) != len(y) or len(y) == 0:
        raise ConvfactorError(f"need as many labels as inputs (and at least one): {len(x)} inputs, {len(y)} labels")
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for start in range(0, len(y), batch_size):
            logits = model(x[start : start + batch_size])
            correct += int((logits.argmax(dim=1) == y[start : start + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / len(y)
