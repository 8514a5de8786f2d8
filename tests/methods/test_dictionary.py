"""Kernel dictionary specifics: shared unit-norm atoms, exact identity at full K, least squares at alpha=0,
sparse codes at alpha>0, rejections."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from convfactor.errors import RankError
from convfactor.methods import get_method
from convfactor.methods.dictionary import Dictionary, DictionaryConv

from .conftest import LayerCase, factorize, relative_error

DICTIONARY = get_method("dictionary")


def test_every_input_channel_uses_the_same_unit_norm_atoms() -> None:
    layer = LayerCase("Conv2d", 6, 8, (3, 3), groups=2).build()
    module = factorize(DICTIONARY, layer, rank=3)
    atoms = module.atoms.weight.detach().reshape(6, 3, 9)
    assert torch.equal(atoms, atoms[:1].expand_as(atoms))
    assert torch.allclose(atoms[0].norm(dim=1), torch.ones(3, dtype=torch.float64), atol=1e-10)
    assert module.atoms.groups == 6 and module.codes.groups == 2


def test_full_k_is_the_identity_dictionary() -> None:
    layer = LayerCase("Conv2d", 4, 5, (3, 2)).build()
    module = factorize(DICTIONARY, layer, rank=1.0)
    assert module.rank == 6
    assert torch.equal(module.atoms.weight.detach().reshape(4, 6, 6)[0], torch.eye(6, dtype=torch.float64))


def test_alpha_zero_is_the_least_squares_dictionary() -> None:
    # The best K-atom dictionary for a dense code spans the top right singular vectors of the kernels.
    layer = LayerCase("Conv2d", 5, 7, (3, 3)).build()
    kernels = layer.weight.detach().reshape(35, 9).numpy()
    s = np.linalg.svd(kernels, compute_uv=False)
    dense = Dictionary(alpha=0.0)
    for k in range(1, 10):
        expected = np.sqrt((s[k:] ** 2).sum() / (s**2).sum())
        assert abs(relative_error(dense.decompose(layer, k).dense_weight(), layer.weight) - expected) <= 1e-12
    assert DICTIONARY.resolve_rank(layer, energy=float((s[:4] ** 2).sum() / (s**2).sum())) == 4


def test_alpha_makes_the_code_sparse_at_a_small_cost() -> None:
    layer = LayerCase("Conv2d", 16, 16, (3, 3)).build()
    dense = Dictionary(alpha=0.0).decompose(layer, 4)
    sparse = Dictionary(alpha=0.5).decompose(layer, 4)
    zeros = float((sparse.codes.weight == 0).double().mean())
    assert float((dense.codes.weight == 0).double().mean()) == 0.0
    assert zeros >= 0.1
    error_dense = relative_error(dense.dense_weight(), layer.weight)
    error_sparse = relative_error(sparse.dense_weight(), layer.weight)
    assert error_dense <= error_sparse <= error_dense + 0.2


@pytest.mark.parametrize(("layer", "reason"), [
    (nn.Conv2d(4, 8, 1), "1x1 conv"),
    (nn.Conv2d(4, 8, 3, groups=4), "already depthwise"),
    (nn.Linear(4, 8), "not Linear"),
])
def test_rejects_with_a_reason(layer: nn.Module, reason: str) -> None:
    assert reason in DICTIONARY.unsupported_reason(layer)
    with pytest.raises(RankError, match="^dictionary cannot represent this layer"):
        DictionaryConv.from_conv(layer)
