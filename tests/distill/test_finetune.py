"""Distillation fine-tuning: the loss goes down, the teacher is untouched, user mistakes raise."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import convfactor
from convfactor.auto import finetune
from tests.auto.conftest import inputs, tiny_resnet


@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_loss_goes_down_in_a_few_steps(loss):
    teacher = tiny_resnet(seed=1)
    x = inputs(16, seed=2)
    student = convfactor.factorize(teacher, {"rules": [{"types": ["Conv2d"], "method": "spatial_svd",
                                                        "rank": 0.25}]}, x[:1])
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    loader = DataLoader(TensorDataset(x, torch.zeros(16)), batch_size=8)  # (x, y) batches: y is ignored
    result = finetune(student, teacher, loader, steps=12, lr=3e-3, loss=loss, progress=False)
    assert len(result.losses) == 12
    # Measured here: the last loss is 2-10x below the first; require a clear drop.
    assert sum(result.losses[-3:]) / 3 < 0.7 * sum(result.losses[:3]) / 3
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not student.training and all(p.requires_grad for p in student.parameters())


def test_user_mistakes():
    teacher = tiny_resnet()
    with pytest.raises(convfactor.ConvfactorError, match="unknown distillation loss"):
        finetune(teacher, teacher, inputs(4, seed=0), steps=1, loss="l1", progress=False)
    with pytest.raises(convfactor.ConvfactorError, match="steps >= 1"):
        finetune(teacher, teacher, inputs(4, seed=0), steps=0, progress=False)
