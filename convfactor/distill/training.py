"""Distillation of a factorized model towards the original on unlabelled inputs, stopped by held-out error.

    loss = sum over outputs o not declared ``ignore`` of
             KL(softmax(teacher_o) || softmax(student_o)) along o's feature axis    if o is declared ``scores``
             KL(teacher_o || student_o) along o's feature axis, on log(max(o, tiny)) if o is ``probabilities``
             mean over o's slices s of  mean (student_s - teacher_s)^2 / scale_s      otherwise

An output that already is a distribution (a final softmax) is declared ``probabilities``: its log is the
logits up to a constant per position, so both class kinds go through the one KL (``finetune.distillation_loss``);
``scores`` on it would take a softmax of probabilities (a near-uniform distribution, gradients ~1/C as large).
``tiny`` is the dtype's smallest normal number: an entry the softmax underflowed to 0 gets a finite log.
    scale_s = the teacher's mean square of slice s on the first batch (each output and slice on its own scale,
              the slices ``convfactor.output_error`` measures the fidelity by)

Every ``check_every`` steps the student is judged on held-out data by a ``Criterion`` (``criterion.py``): the
task metric on its select set when the user gave one with a select set, else the worst-slice error on the
SELECT part of the data (``convfactor.auto.statistics.split``); the best state by that criterion is kept, and
the run stops after ``patience`` checks without improvement, after ``steps`` steps or when its time is spent.
The check part is never seen here. Structural zeros stay zero (``finetune.structural_masks``). Memory: the
teacher's outputs are recomputed per batch (one batch of activations, two parameter copies: the starting and
the best state).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..batches import output_leaves
from ..errors import ConvfactorError
from ..fidelity_spec import CLASS_KINDS
from ..output_checker import OutputChecker
from ..output_error import OutputLayout
from ..progress import open_bar
from .criterion import Criterion, Judgement
from .finetune import distillation_loss, masked_step, structural_masks

__all__ = ["DistillOptions", "DistillRun", "as_distill_options", "output_losses", "distill_model",
           "DEFAULT_BATCH", "DEFAULT_LR"]

# Batch 32 processes samples as fast as 64 or 128 on CPU while giving 2-4x the optimizer steps; lr 1e-4 is
# the Adam rate of the measured recoveries (docs/distill.md gives the numbers).
DEFAULT_BATCH = 32
DEFAULT_LR = 1e-4


@dataclass(frozen=True)
class DistillOptions:
    """How ``factorize(..., distill=...)`` distils the result towards the original (docs/distill.md).

    Attributes:
        steps: Adam steps at most (one batch each).
        data: unlabelled inputs to distil on (a tensor, a list of batches, a DataLoader); None: the calibration
            data's fit part. Never the select or check parts: they decide and measure.
        lr: Adam learning rate.
        batch_size: samples per step.
        threads: torch threads while distilling (None: as set).
        check_every: steps between select-part measurements (None: ``max(10, steps // 10)``).
        patience: checks without a lower select error before stopping.
        time_budget: seconds the distillation may take (None: what ``AutoOptions.time_budget`` leaves, else none).
        temperature: softening of the KL loss of ``scores`` and ``probabilities`` outputs.
        seed: order of the batches.
        probes: with a fidelity bound, failing search probes distilled before they are judged, at most
            (``convfactor.auto.search.distill_probes``); 0: the search judges undistilled models.
        probe_steps: steps of each distilled probe (at most ``steps``).
    """

    steps: int = 200
    data: Any = field(default=None, repr=False, compare=False)
    lr: float = DEFAULT_LR
    batch_size: int = DEFAULT_BATCH
    threads: int | None = None
    check_every: int | None = None
    patience: int = 3
    time_budget: float | None = None
    temperature: float = 1.0
    seed: int = 0
    probes: int = 3
    probe_steps: int = 50

    def __post_init__(self):
        whole = {"steps": self.steps, "batch_size": self.batch_size, "patience": self.patience,
                 "probe_steps": self.probe_steps}
        if isinstance(self.probes, bool) or not isinstance(self.probes, int) or self.probes < 0:
            raise ConvfactorError(f"distill probes must be a whole number >= 0, got {self.probes!r}")
        whole.update({k: v for k, v in (("threads", self.threads), ("check_every", self.check_every)) if v is not None})
        for name, value in whole.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConvfactorError(f"distill {name} must be a whole number >= 1, got {value!r}")
        for name, value in (("lr", self.lr), ("temperature", self.temperature), ("time_budget", self.time_budget)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value < math.inf):
                raise ConvfactorError(f"distill {name} must be a positive number, got {value!r}")

    @property
    def every(self) -> int:
        return self.check_every or max(10, self.steps // 10)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "lr": self.lr, "batch_size": self.batch_size, "threads": self.threads,
                "check_every": self.every, "patience": self.patience, "time_budget": self.time_budget,
                "temperature": self.temperature, "seed": self.seed, "probes": self.probes,
                "probe_steps": self.probe_steps}


def as_distill_options(value: Any) -> DistillOptions | None:
    """``distill=`` as ``factorize`` takes it: None, a number of steps, or ``DistillOptions``."""
    if value is None or isinstance(value, DistillOptions):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return DistillOptions(steps=value)
    raise ConvfactorError(f"distill must be a number of steps or convfactor.auto.DistillOptions, "
                          f"not {type(value).__name__}")


@dataclass(frozen=True)
class _OutputLoss:
    kind: str  # "kl" (scores) | "kl_probabilities" | "mse" | "none"
    axis: int | None
    slices: tuple[tuple[int, int], ...]
    scales: tuple[float, ...]

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor | None:
        if self.kind == "none":
            return None
        if self.kind in ("kl", "kl_probabilities"):  # the feature axis last: (N, ..., C)
            s, t = (torch.movedim(v, self.axis, -1).reshape(-1, v.shape[self.axis]) for v in (student, teacher))
            if self.kind == "kl_probabilities":
                s, t = (v.clamp_min(torch.finfo(v.dtype).tiny).log() for v in (s, t))
            return distillation_loss(s, t, "kl", temperature)
        terms = []
        for (start, stop), scale in zip(self.slices, self.scales):
            s = student if self.axis is None else student.narrow(self.axis, start, stop - start)
            t = teacher if self.axis is None else teacher.narrow(self.axis, start, stop - start)
            terms.append(F.mse_loss(s, t) / scale)
        return torch.stack(terms).mean()

    def describe(self) -> str:
        return {"kl": "kl (declared scores)", "kl_probabilities": "kl on log probabilities (declared probabilities)",
                "none": "none (declared ignore)"}.get(
            self.kind, f"mse, relative per slice ({len(self.slices)} slice(s))")


def output_losses(layouts: Sequence[OutputLayout], teacher: Sequence[torch.Tensor]) -> list[_OutputLoss]:
    """Per output, the loss its declaration asks for (see the module docstring), with each MSE slice's scale
    from ``teacher`` (the original's outputs on one batch)."""
    losses = []
    for layout, reference in zip(layouts, teacher):
        if layout.kind == "ignore":
            losses.append(_OutputLoss("none", None, (), ()))
            continue
        axis = None if layout.axis is None or reference.dim() <= layout.axis else layout.axis
        if layout.kind in CLASS_KINDS and axis is not None:
            losses.append(_OutputLoss("kl" if layout.kind == "scores" else "kl_probabilities", axis, (), ()))
            continue
        slices = ((0, 0),) if axis is None else tuple((a, b) for _, a, b in layout.slices)
        scales = []
        for start, stop in slices:
            part = reference if axis is None else reference.narrow(axis, start, stop - start)
            square = float(part.double().pow(2).mean()) if part.numel() else 0.0
            scales.append(square if square > 0 else 1.0)
        losses.append(_OutputLoss("mse", axis, slices, tuple(scales)))
    return losses


@dataclass
class DistillRun:
    """What one distillation did: steps run, why it stopped, the loss and the held-out judgements it was kept by."""

    steps_run: int = 0
    stopped: str = ""
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    # [{"step", "seconds" (since the start, judging included), "rel_error", "metric" (when the metric decides)}],
    # step 0 = undistilled
    select: list[dict[str, float]] = field(default_factory=list)
    criterion: dict[str, Any] = field(default_factory=dict)  # Criterion.describe(): what decided, and why
    start: Judgement | None = None  # the undistilled state's judgement
    best: Judgement | None = None  # the best distilled state's (None: no step ran)
    best_step: int = 0  # the best distilled state's step (0: no step ran)
    improved: bool = False  # the best distilled state is better than the undistilled one (Criterion.better)
    fixed_zeros: int = 0
    output_losses: list[str] = field(default_factory=list)
    rejected_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # not improved: the best tried

    def to_dict(self) -> dict[str, Any]:
        first = self.losses[0] if self.losses else None
        last = sum(self.losses[-10:]) / len(self.losses[-10:]) if self.losses else None
        return {"steps_run": self.steps_run, "stopped": self.stopped, "seconds": round(self.seconds, 2),
                "loss_first": _round(first), "loss_last10": _round(last), "select": self.select,
                "decided_by": self.criterion, "best_step": self.best_step, "improved": self.improved,
                "fixed_zeros": self.fixed_zeros, "output_losses": self.output_losses}


def _round(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(f"{value:.5g}")


def _chunks(batches: Sequence[tuple[torch.Tensor, ...]], size: int) -> list[tuple[torch.Tensor, ...]]:
    """The batches cut into steps of at most ``size`` samples (views, no copies)."""
    return [tuple(t[start:start + size] for t in batch) for batch in batches for start in range(0, len(batch[0]), size)]


def _stream(chunks: list[tuple[torch.Tensor, ...]], seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(seed)
    while True:  # every chunk once per pass, in a fresh seeded order
        for index in torch.randperm(len(chunks), generator=generator).tolist():
            yield chunks[index]


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def distill_model(student: nn.Module, teacher: nn.Module, batches: Sequence[tuple[torch.Tensor, ...]],
                  select: OutputChecker, options: DistillOptions, *, progress: bool | str = False,
                  seconds: float | None = None, label: str = "distill",
                  criterion: Criterion | None = None) -> DistillRun:
    """Distil ``teacher`` into ``student`` (in place) on ``batches``; ``student`` ends in its best state.

    Args:
        student: the factorized model; trained in place and left in eval mode in its best distilled state
            when ``criterion`` judges that better than its starting one, else in its starting state.
        teacher: the original network (run without gradients, never changed).
        batches: the unlabelled inputs (input tuples); cut into ``options.batch_size`` steps.
        select: the checker of the select part; its layouts (declared kinds, slices) choose each output's loss.
        options: ``DistillOptions``.
        progress: a progress bar with ETA, the loss and the best select error (and metric).
        seconds: wall-clock limit (None: ``options.time_budget``, else none).
        label: the progress bar's name.
        criterion: how a state is judged and which is better (default: ``Criterion(select)``: the metric on
            its select set when ``select.metric`` has one, else the select part's output error).
    Returns:
        A ``DistillRun``.
    """
    started = time.perf_counter()
    seconds = options.time_budget if seconds is None else seconds
    criterion = criterion or Criterion(select)
    chunks = _chunks(batches, options.batch_size)
    if not chunks:
        raise ConvfactorError("distillation data is empty")
    params = [p for p in student.parameters() if p.is_floating_point()]
    if not params:
        raise ConvfactorError("the model has no floating-point parameters to distil")
    run = DistillRun(criterion=criterion.describe())
    student.eval()
    teacher.eval()
    with _threads(options.threads):
        with torch.no_grad():
            losses = output_losses(select.layouts, output_leaves(teacher(*chunks[0])))
        run.output_losses = [f"{layout.name}: {loss.describe()}" for layout, loss in zip(select.layouts, losses)]
        if all(loss.kind == "none" for loss in losses):
            raise ConvfactorError("distillation has nothing to match: every output is declared 'ignore'")
        run.start = criterion.judge(student)
        run.select.append({"step": 0, "seconds": round(time.perf_counter() - started, 1), **run.start.to_dict()})
        start_state = _copy_state(student)
        best_state = None  # the best distilled state (step >= 1) by the criterion
        grad_flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=options.lr)
        masks = structural_masks(student)
        run.fixed_zeros = sum(int((keep == 0).sum()) for _, keep in masks)
        bar = open_bar(progress, label, total=options.steps, unit="step")
        stream, since, measured_at = _stream(chunks, options.seed), 0, 0

        def judge_now(step: int) -> bool:
            """Judge the state; True when it is the best distilled one so far."""
            nonlocal best_state
            judgement = criterion.judge(student)
            run.select.append({"step": step, "seconds": round(time.perf_counter() - started, 1),
                               **judgement.to_dict()})
            if criterion.better(judgement, run.best):
                run.best, best_state, run.best_step = judgement, _copy_state(student), step
                return True
            return False

        def shown() -> dict[str, str]:
            """The progress bar's held-out numbers: the best state's so far (the undistilled one's at first)."""
            judged = run.best if run.best is not None and criterion.better(run.best, run.start) else run.start
            return {"select": f"{judged.rel_error:.4g}",
                    **({} if judged.metric is None else {"metric": f"{judged.metric:.4g}"})}

        try:
            for step in range(1, options.steps + 1):
                if seconds is not None and time.perf_counter() - started > seconds:
                    run.stopped = f"time budget ({seconds:.3g} s) spent"
                    break
                batch = next(stream)
                with torch.no_grad():
                    targets = output_leaves(teacher(*batch))
                outputs = output_leaves(student(*batch), detach=False)
                terms = [loss(o, t, options.temperature) for loss, o, t in zip(losses, outputs, targets)]
                value = sum(term for term in terms if term is not None)
                masked_step(optimizer, value, masks)
                run.losses.append(float(value.detach()))
                run.steps_run = step
                bar.update(1)
                bar.set_postfix(loss=f"{run.losses[-1]:.4g}", **shown())
                if step % options.every == 0 or step == options.steps:
                    measured_at = step
                    since = 0 if judge_now(step) else since + 1
                    if since >= options.patience:
                        run.stopped = (f"early stop: no better {criterion.name} in {options.patience} checks "
                                       f"after step {run.best_step}")
                        break
            if run.steps_run > measured_at:  # stopped by time between checks: judge the last state too
                judge_now(run.steps_run)
        finally:
            bar.close()
            for p, flag in zip(params, grad_flags):
                p.requires_grad_(flag)
            student.eval()
        run.improved = run.best is not None and criterion.better(run.best, run.start)
        if not run.improved:
            run.rejected_state = best_state
        student.load_state_dict(best_state if run.improved else start_state)
    run.stopped = run.stopped or f"{options.steps} steps"
    run.seconds = time.perf_counter() - started
    return run
