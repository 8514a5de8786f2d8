"""Fine-tuning keeps structural zeros (convfactor/distill/finetune.py with the modules' ``structural_zeros``):
sal's pruned taps and the dictionary's sparse code stay exactly zero, the other weights still train."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import convfactor
from convfactor.auto import finetune
from convfactor.distill.finetune import structural_masks
from convfactor.methods import get_method
from convfactor.methods.sal import SALConv
from convfactor.share import finetune_codebooks, share_weights
from tests.auto.conftest import inputs, tiny_resnet

SAL_POLICY = {"rules": [{"types": ["Conv2d"], "method": "sal", "rank": 2}]}


def _sal_student() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    teacher = tiny_resnet(seed=1)
    x = inputs(16, seed=2)
    return convfactor.factorize(teacher, SAL_POLICY, x[:1]), teacher, x


def _sal_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.conv.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, SALConv)}


def test_sal_zeros_stay_exactly_zero_and_the_kept_taps_train() -> None:
    student, teacher, x = _sal_student()
    before = _sal_weights(student)
    zeros = {name: w == 0 for name, w in before.items()}
    result = finetune(student, teacher, x, steps=6, lr=1e-2, weight_decay=1e-2, progress=False)
    after = _sal_weights(student)
    assert result.fixed_zeros == sum(int(z.sum()) for z in zeros.values()) > 0
    for name, w in after.items():
        assert torch.equal(w[zeros[name]], torch.zeros_like(w[zeros[name]])), name
        moved = (w != before[name])[~zeros[name]]
        assert float(moved.float().mean()) > 0.9, (name, float(moved.float().mean()))  # measured: all moved
    # The module still declares the same zeros: a SAL model after fine-tuning, its p_u unchanged.
    for name, module in student.named_modules():
        if isinstance(module, SALConv):
            assert torch.equal(module.structural_zeros()["conv.weight"], zeros[name]), name


def test_without_the_mask_the_zeros_move() -> None:
    """What the mask prevents: the same fine-tune with keep_zeros=False refills the pruned taps."""
    student, teacher, x = _sal_student()
    before = _sal_weights(student)
    result = finetune(student, teacher, x, steps=6, lr=1e-2, progress=False, keep_zeros=False)
    assert result.fixed_zeros == 0
    after = _sal_weights(student)
    refilled = sum(int((after[n][before[n] == 0] != 0).sum()) for n in before)
    total = sum(int((before[n] == 0).sum()) for n in before)
    assert refilled > 0.5 * total, (refilled, total)  # measured: 6,722 of 8,232 (0.82)


def test_the_dictionary_code_keeps_its_lasso_zeros() -> None:
    teacher = tiny_resnet(seed=1)
    x = inputs(16, seed=2)
    student = convfactor.factorize(teacher, {"rules": [{"match": "layer*", "types": ["Conv2d"],
                                                        "method": "dictionary", "rank": 4}]}, x[:1])
    assert get_method("dictionary").alpha > 0  # weight-only fit: the lasso code has zeros
    codes = {name: m.codes.weight.detach().clone() for name, m in student.named_modules() if hasattr(m, "codes")}
    total = sum(int((c == 0).sum()) for c in codes.values())
    assert total > 0
    result = finetune(student, teacher, x, steps=4, lr=1e-2, progress=False)
    assert result.fixed_zeros == total
    for name, module in student.named_modules():
        if name in codes:
            w = module.codes.weight.detach()
            assert torch.equal(w[codes[name] == 0], torch.zeros_like(w[codes[name] == 0])), name
            assert bool((w != codes[name])[codes[name] != 0].any()), name


def test_full_rank_sal_and_dense_layers_declare_no_zeros() -> None:
    layer = nn.Conv2d(3, 4, 3)
    assert not structural_masks(SALConv.from_conv(layer, rank=9))
    assert not structural_masks(convfactor.factorize(tiny_resnet(), "spatial_svd", inputs(1, seed=0)))
    assert not structural_masks(tiny_resnet())


def test_a_mask_follows_the_parameter_dtype_and_the_union_of_two_declarations() -> None:
    sal = SALConv.from_conv(nn.Conv2d(2, 3, 3).double(), rank=1)
    [(param, keep)] = structural_masks(nn.Sequential(sal, sal))  # the same module twice: one mask
    assert param is sal.conv.weight and keep.dtype == torch.float64
    assert torch.equal(keep == 0, sal.structural_zeros()["conv.weight"])


def test_codebook_fine_tuning_of_a_shared_sal_model_still_runs() -> None:
    """Weight sharing parametrizes the weights: the sal mask names no plain parameter and is skipped."""
    student, teacher, x = _sal_student()
    shared = share_weights(student, bits=4)
    reference = copy.deepcopy(teacher)
    result = finetune_codebooks(shared, reference, x, steps=2, lr=1e-3, progress=False)
    assert len(result.losses) == 2


@pytest.mark.parametrize("keep_zeros", [True, False])
def test_the_callers_teacher_is_never_touched(keep_zeros: bool) -> None:
    student, teacher, x = _sal_student()
    before = copy.deepcopy(teacher.state_dict())
    finetune(student, teacher, x, steps=2, lr=1e-2, progress=False, keep_zeros=keep_zeros)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
