"""A task metric for ``convfactor convert --metric examples/digits_metric.py:accuracy``.

``accuracy(model)`` is the top-1 accuracy of a digits classifier on the 450 held-out scikit-learn digits
images (none of them is a calibration image): the number the automatic policy bounds with
``--max-metric-drop`` and reports for the original and the result. A metric where lower is better sets
``fn.higher_is_better = False``.

    convfactor convert resnet20_digits.pt --arch convfactor.zoo.resnet:resnet20 --input-shape 1,3,32,32 \\
        --policy auto.yaml --calibration calibration.pt --metric examples/digits_metric.py:accuracy \\
        --max-metric-drop 0.01 --out fast.pt
"""

from __future__ import annotations

import torch

from convfactor.zoo.digits import load_digits_split

_X, _Y = load_digits_split("test")


def accuracy(model: torch.nn.Module) -> float:
    """Top-1 accuracy on the held-out digits (the model is in eval mode, gradients off)."""
    with torch.no_grad():
        return float((model(_X).argmax(1) == _Y).float().mean())
