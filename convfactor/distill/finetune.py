"""Optional: a short knowledge distillation of a factorized model towards the original's outputs.

Factorization without data, or with a tight budget, shifts the outputs; a few hundred optimizer steps
on unlabelled inputs, with the original network as the teacher, recover much of it. Labels are never
needed: the loss compares the two networks' outputs (KL divergence of the softened class distributions,
or mean squared error of the raw outputs).

The student is trained in eval mode: factorize folds BatchNorm away, and a model that still has
BatchNorm should not have its running statistics overwritten by a few small batches.

Structural zeros stay zero: a module that declares some of its parameters' entries fixed at zero (a
``structural_zeros()`` method returning {parameter name: bool mask}, as sal's and the dictionary's modules
do) has those entries' gradients zeroed before every step and the entries set back to zero after it, so
neither the gradient nor the optimizer's momentum or weight decay moves them (``keep_zeros=False`` lets
them move). The fine-tuner knows no method by name: the modules say which entries are fixed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..batches import output_leaves
from ..errors import ConvfactorError
from ..progress import open_bar

__all__ = ["FinetuneResult", "finetune", "distillation_loss", "structural_masks", "masked_step", "LOSSES"]

LOSSES = ("kl", "mse")


@dataclass
class FinetuneResult:
    """Loss per step (before the step's update) and the settings used."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    lr: float = 0.0
    loss: str = "kl"
    fixed_zeros: int = 0  # parameter entries held at zero (structural zeros, see the module docstring)

    @property
    def first(self) -> float:
        return self.losses[0]

    @property
    def last(self) -> float:
        return self.losses[-1]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "kl",
                      temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) * T^2 over the last axis, or MSE of the outputs.

    Args:
        student, teacher: outputs of the same shape (logits for ``kl``).
        kind: ``"kl"`` or ``"mse"``.
        temperature: softening of ``kl`` (T); the T^2 factor keeps gradients comparable across T.
    """
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind == "kl":
        log_p = F.log_softmax(teacher / temperature, dim=-1)
        log_q = F.log_softmax(student / temperature, dim=-1)
        return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * temperature**2
    raise ConvfactorError(f"unknown distillation loss {kind!r}; choose one of {', '.join(LOSSES)}")


def structural_masks(model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, keep mask: 0 at a structural zero, 1 elsewhere, the parameter's dtype) for every parameter
    of ``model`` whose module declares fixed zeros (``structural_zeros()``); a parameter named twice gets
    the union of its zeros. A name that is not a plain parameter (e.g. a parametrized weight) is skipped."""
    masks: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    for module in model.modules():
        declare = getattr(module, "structural_zeros", None)
        if not callable(declare):
            continue
        for name, zeros in declare().items():
            try:
                param = module.get_parameter(name)
            except AttributeError:
                continue
            keep = (~zeros.to(device=param.device, dtype=torch.bool)).to(param.dtype)
            if id(param) in masks:
                keep = keep * masks[id(param)][1]
            masks[id(param)] = (param, keep)
    return [(param, keep) for param, keep in masks.values() if not bool(keep.all())]


def _batches(data: Any, n_inputs: int) -> Callable[[], list[tuple[torch.Tensor, ...]]]:
    if isinstance(data, torch.Tensor):
        chunks = [(chunk,) for chunk in data.split(64)]
        return lambda: chunks
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise ConvfactorError(f"finetune data must be a tensor, a list of batches or a DataLoader, "
                              f"not {type(data).__name__}")

    def one_pass() -> list[tuple[torch.Tensor, ...]]:
        out = []
        for batch in data:
            tensors = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)[:n_inputs]
            if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
                raise ConvfactorError("each finetune batch must hold the model's input tensor(s)")
            out.append(tensors)
        if not out:
            raise ConvfactorError("finetune data is empty")
        return out

    return one_pass


def finetune(
    factorized: nn.Module,
    teacher: nn.Module,
    data: Any,
    steps: int = 100,
    lr: float = 1e-4,
    loss: str = "kl",
    progress: bool = True,
    *,
    temperature: float = 1.0,
    n_inputs: int = 1,
    weight_decay: float = 0.0,
    keep_zeros: bool = True,
) -> FinetuneResult:
    """Distil ``teacher`` into ``factorized`` for ``steps`` Adam steps (optional; modifies ``factorized``).

    Args:
        factorized: the student, e.g. the result of ``convfactor.factorize``; trained in place.
        teacher: the original network (left unchanged, run without gradients).
        data: inputs only (a tensor split into batches of 64, a list of batches or a DataLoader;
            ``(x, y)`` batches keep their first ``n_inputs`` tensors); cycled until ``steps``.
        steps: optimizer steps.
        lr: Adam learning rate.
        loss: ``"kl"`` (classifier logits) or ``"mse"`` (any output).
        progress: show a progress bar.
        temperature: softening of the KL loss.
        n_inputs: how many tensors the model takes.
        weight_decay: Adam weight decay.
        keep_zeros: keep the structural zeros the modules declare (sal's pruned taps, the dictionary's
            sparse code) at zero; ``False`` trains every entry.
    Returns:
        A ``FinetuneResult`` with the loss of every step and the number of entries held at zero.

    Example:
        >>> small = convfactor.factorize(model, policy, x, calibration=calib)
        >>> result = finetune(small, model, train_x, steps=200, lr=1e-4)
        >>> result.last < result.first
        True
    """
    if loss not in LOSSES:
        raise ConvfactorError(f"unknown distillation loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if steps < 1 or lr <= 0:
        raise ConvfactorError(f"finetune needs steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    params = [p for p in factorized.parameters() if p.is_floating_point()]
    if not params:
        raise ConvfactorError("the model has no floating-point parameters to fine-tune")
    source = _batches(data, n_inputs)
    was_training = factorized.training, teacher.training
    grad_flags = [p.requires_grad for p in params]
    factorized.eval()
    teacher.eval()
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    masks = structural_masks(factorized) if keep_zeros else []
    result = FinetuneResult(steps=steps, lr=lr, loss=loss,
                            fixed_zeros=sum(int((keep == 0).sum()) for _, keep in masks))
    stream = itertools.chain.from_iterable(source() for _ in itertools.count())
    bar = open_bar(progress, "finetune", total=steps, unit="step")
    try:
        for _, batch in zip(range(steps), stream):
            with torch.no_grad():
                targets = output_leaves(teacher(*batch))
            outputs = output_leaves(factorized(*batch), detach=False)
            value = sum(distillation_loss(o, t.detach(), loss, temperature) for o, t in zip(outputs, targets))
            masked_step(optimizer, value, masks)
            result.losses.append(float(value.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.4g}")
    finally:
        bar.close()
        for p, flag in zip(params, grad_flags):
            p.requires_grad_(flag)
        factorized.train(was_training[0])
        teacher.train(was_training[1])
    return result


def masked_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, masks: list) -> None:
    """One optimizer step on ``loss`` that leaves structural zeros at zero: each masked parameter's gradient
    is zeroed where its mask is 0 before the step, and the entries set back to 0 after it (so neither momentum
    nor weight decay moves them). ``masks``: (parameter, keep mask) pairs (``structural_masks``)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for param, keep in masks:
        if param.grad is not None:
            param.grad.mul_(keep)
    optimizer.step()
    with torch.no_grad():
        for param, keep in masks:
            param.mul_(keep)
