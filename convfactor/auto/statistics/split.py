"""Which samples fit and which measure: the deterministic split of the data an automatic policy gets.

    calibration only:    sample i (in the order given)  i % 8 == 3 -> select,  i % 8 == 7 -> check,  else fit
    validation given:    every calibration sample fits;  validation sample j: j even -> select, odd -> check
    neither:             the example inputs are both select and check (weight-only fits see no data)

``fit`` feeds the statistics, data-aware factors, sensitivity probes and the sequential refit. ``select``
feeds every measurement a decision is made by (the fidelity bisection's probes, the speed check's undo, the
regularization choice). ``check`` is measured once, on the returned model: the held-out number the report
shows, which no fit, refit or selection saw. Interleaving (not a head/tail cut) keeps each part drawn from
the whole set when the data come sorted (by class, by file, by time).

Floor: each measuring part holds at least ``MIN_PART`` samples. Calibration of fewer than ``4 * 8 = 32``
samples without ``validation`` holds nothing out: every check then runs on the fit samples, and the
report says so with an accuracy warning. Validation of fewer than ``2 * MIN_PART`` samples is not split:
the search and the final check both use it (said in the report).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["MIN_PART", "DataSplit", "split_data", "first_samples"]

MIN_PART = 4
_PERIOD, _SELECT, _CHECK = 8, 3, 7


@dataclass
class DataSplit:
    """The fit, select and check batches, and how they were drawn (``describe`` for the report)."""

    fit: list[tuple[torch.Tensor, ...]] | None
    select: list[tuple[torch.Tensor, ...]] | None
    check: list[tuple[torch.Tensor, ...]] | None
    source: str  # "calibration" | "validation" | "example inputs" | "none"
    held_out: bool  # check saw no fit
    shared: bool = False  # check == select (too little validation data to split)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"fit": _count(self.fit), "select": _count(self.select), "check": _count(self.check),
                "source": self.source, "held_out": self.held_out, "check_is_select": self.shared,
                "rule": _RULES[self.source]}

    @property
    def check_label(self) -> str:
        """How the report names the check data: 'held-out calibration samples', 'validation samples', ..."""
        if self.source == "calibration":
            return "held-out calibration samples" if self.held_out else "calibration samples (in-sample: not held out)"
        return {"validation": "validation samples", "example inputs": "example inputs"}.get(self.source, "samples")


_RULES = {
    "calibration": f"calibration sample i: i % {_PERIOD} == {_SELECT} select, i % {_PERIOD} == {_CHECK} check, "
                   "else fit",
    "validation": "calibration fits; validation sample j: even select, odd check",
    "example inputs": "no data: the example inputs are measured (weights-only fits saw no data)",
    "none": "nothing to measure on",
}


def split_data(calibration: list[tuple[torch.Tensor, ...]] | None, validation: list[tuple[torch.Tensor, ...]] | None,
               inputs: tuple[torch.Tensor, ...] | None) -> DataSplit:
    """The split above, for calibration and validation batches (lists of input tuples) and example inputs."""
    if validation is not None:
        if _count(validation) >= 2 * MIN_PART:
            select, check = _take(validation, lambda j: j % 2 == 0), _take(validation, lambda j: j % 2 == 1)
            return DataSplit(calibration, select, check, "validation", True)
        return DataSplit(calibration, validation, validation, "validation", True, shared=True,
                         notes=[f"validation has {_count(validation)} samples (< {2 * MIN_PART}): the search and the "
                                "final check both measure on all of them"])
    if calibration is not None:
        total = _count(calibration)
        if total >= MIN_PART * _PERIOD:
            fit = _take(calibration, lambda i: i % _PERIOD not in (_SELECT, _CHECK))
            select = _take(calibration, lambda i: i % _PERIOD == _SELECT)
            check = _take(calibration, lambda i: i % _PERIOD == _CHECK)
            return DataSplit(fit, select, check, "calibration", True)
        return DataSplit(calibration, calibration, calibration, "calibration", False, shared=True,
                         notes=[f"calibration has {total} samples (< {MIN_PART * _PERIOD}): none held out"])
    if inputs is not None:
        return DataSplit(None, [inputs], [inputs], "example inputs", True, shared=True)
    return DataSplit(None, None, None, "none", False)


def _count(batches: list[tuple[torch.Tensor, ...]] | None) -> int:
    return 0 if batches is None else int(sum(len(b[0]) for b in batches))


def _take(batches: list[tuple[torch.Tensor, ...]], keep: Callable[[int], bool]) -> list[tuple[torch.Tensor, ...]]:
    """The samples whose running index ``keep`` accepts, regrouped into batches no larger than the input's
    largest (consecutive picks of the same trailing shapes are joined)."""
    limit = max(len(b[0]) for b in batches)
    out: list[tuple[torch.Tensor, ...]] = []
    group: list[tuple[torch.Tensor, ...]] = []
    offset = 0

    def flush() -> None:
        if group:
            out.append(tuple(torch.cat(parts) for parts in zip(*group)))
            group.clear()

    for batch in batches:
        size = len(batch[0])
        picked = [j for j in range(size) if keep(offset + j)]
        offset += size
        if not picked:
            continue
        index = torch.tensor(picked)
        part = tuple(t.index_select(0, index.to(t.device)) for t in batch)
        signature = [tuple(t.shape[1:]) for t in part]
        if group and ([tuple(t.shape[1:]) for t in group[0]] != signature
                      or sum(len(g[0]) for g in group) + len(picked) > limit):
            flush()
        group.append(part)
    flush()
    return out


def first_samples(batches: list, count: int) -> list:
    """The first ``count`` samples of ``batches`` (the last batch cut), as a new list of batches."""
    subset, seen = [], 0
    for batch in batches:
        if seen >= count:
            break
        take = min(len(batch[0]), count - seen)
        subset.append(tuple(t[:take] for t in batch))
        seen += take
    return subset
