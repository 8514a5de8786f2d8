"""Installing a module at a qualified name (``"layer1.0.conv1"``) of a module tree."""

from __future__ import annotations

from torch import nn

__all__ = ["set_submodule"]


def set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    """Put ``module`` at ``target`` in ``root`` (its parent must exist), replacing what was there."""
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
