"""Work that resolutions of one network on one data set share: statistics, candidates, sensitivities.

A sweep (``convfactor.sweep``) resolves the same network for several targets. Three of the most
expensive phases of ``resolve_policy`` do not depend on the target's fraction:

- the layers' input statistics: one pass over the fit samples (``layer_statistics``);
- the candidates of every open layer, with costs and predicted errors (``build_options``);
- each layer's sensitivity: one network pass per probed layer (``measure_sensitivities``).

They depend on the network's weights, the fit samples, the options that shape them and, for candidates
and sensitivities, the target's kind (the costs a candidate is filtered and probed by). ``SharedWork`` keeps
what the first resolution computed under a key made of exactly these, and gives every later resolution with
the same key copies of it, so a point of a sweep is allocated from the same numbers a lone ``factorize``
would compute. A candidate's predicted error does not depend on the kind: the errors are kept per network,
data and options (``selection.error_memo``), so a latency point fits only the ranks no MACs or params point
scored. It also shares one ``LatencyModel`` per set of latency options (its in-memory timings), the task
metric of the original network (one evaluation of the user's metric per network and ``Metric`` object: every
point of a sweep starts from the same original), and the original's outputs on the fit, select and check
samples its output checkers compare against (one network pass per part and sweep instead of per point; the
references stay while the ``SharedWork`` does, at most ``REFERENCE_BYTES`` per part).

``counts`` says how often each phase was computed rather than reused (the sweep's tests count on it; under
"candidate errors", how many (layer, method, rank) errors were fitted), ``seconds`` how long the computing took.
Nothing here times or measures: a phase cut short by ``AutoOptions.time_budget`` is not kept.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .options import AutoOptions
from .selection.plans import Choice, apply_choices

__all__ = ["SharedWork"]

# The AutoOptions fields the statistics, candidates and sensitivities depend on (the rest shape later phases).
_SHAPING = ("fractions", "auto_methods", "vbmf", "max_samples", "max_rows", "damping", "sensitivity",
            "sensitivity_samples", "seed", "memory_budget")


@dataclass
class _Scored:
    """One layer's state after candidates and sensitivities (what ``resolve_policy`` goes on from)."""

    options: list
    dropped: list[str]
    notes: list[str]
    decision: str | None
    original_latency_ms: float | None
    sensitivity: float


class SharedWork:
    """Statistics, candidates and sensitivities of one network, reused by every resolution that can.

    Pass the same object to several ``factorize(..., shared=work)`` / ``resolve_policy(..., shared=work)``
    calls on one model and calibration set; each call computes what it does not find and keeps it.

    Example:
        >>> work = SharedWork()
        >>> a = factorize(model, {"target": {"macs": 0.5}, "rules": [{"method": "auto"}]}, x, calibration=data,
        ...               shared=work)
        >>> b = factorize(model, {"target": {"macs": 0.3}, "rules": [{"method": "auto"}]}, x, calibration=data,
        ...               shared=work)
        >>> work.counts["statistics"], work.counts["candidates"]
        (1, 1)
    """

    def __init__(self) -> None:
        self._statistics: dict[tuple, dict[str, Any]] = {}
        self._scored: dict[tuple, tuple[dict[str, _Scored], list[str]]] = {}
        self._errors: dict[tuple, dict[str, dict]] = {}  # {layer: {method: MethodErrors}} per network, data, options
        self._latency: dict[str, Any] = {}
        self._metric: dict[tuple, tuple[Any, float]] = {}
        self._outputs: dict[tuple, list] = {}
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()

    def __getstate__(self) -> dict[str, Any]:  # shipped to worker processes: no lock, no timing sessions,
        state = dict(self.__dict__)                # no reference outputs (up to REFERENCE_BYTES a part)
        state["_lock"] = None
        state["_latency"] = {}
        state["_outputs"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def statistics(self, network: tuple, layers: Mapping[str, nn.Module], batches: Sequence[tuple],
                   opts: AutoOptions, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The layers' statistics: kept ones for this network (``network``: ``SharedWork.network(root)``), data
        and options, else ``compute()``."""
        key = (network, _data_key(batches), _options_key(opts), tuple(layers))
        with self._lock:
            found = self._statistics.get(key)
        if found is not None:
            return dict(found)
        started = time.perf_counter()
        stats = compute()
        with self._lock:
            self._statistics[key] = dict(stats)
            self.counts["statistics"] += 1
            self.seconds["statistics"] += time.perf_counter() - started
        return stats

    def scored(self, network: tuple, plans: list, kind: str, batches: Sequence[tuple] | None, opts: AutoOptions,
               latency: Any, notes: list[str], compute: Callable[[dict], bool]) -> None:
        """Candidates and sensitivities of the open ``plans``: restored from a kept copy, else ``compute(memo)``
        (which fills the plans and returns False when a deadline cut it short: then nothing is kept).
        Notes ``compute`` adds to ``notes`` are kept and added again on reuse. ``memo``: the candidates' errors
        kept for this network, data and options whatever the kind (``selection.error_memo``), which
        ``compute`` reads and adds to (kept even when it is cut short: each error is a finished fit's)."""
        open_plans = [p for p in plans if p.open]
        key = (network, _data_key(batches or []), _options_key(opts), kind, repr(latency),
               tuple((p.name, tuple(m.name for m in p.methods), p.rule.align, p.in_shape, p.calls)
                     for p in open_plans))
        with self._lock:
            found = self._scored.get(key)
        if found is not None:
            by_name, added = found
            for plan in open_plans:
                _restore(plan, by_name[plan.name])
            notes.extend(added)
            return
        errors_key = (network, key[1], key[2])
        with self._lock:
            memo = self._errors.setdefault(errors_key, {})
        before, started, known = len(notes), time.perf_counter(), _count_errors(memo)
        complete = compute(memo)
        with self._lock:
            self.counts["candidate errors"] += _count_errors(memo) - known
        if not complete:
            return
        kept = {p.name: _snapshot(p) for p in open_plans}
        with self._lock:
            self._scored[key] = (kept, list(notes[before:]))
            self.counts["candidates"] += 1
            self.seconds["candidates and sensitivities"] += time.perf_counter() - started
            if batches is not None and opts.sensitivity:
                self.counts["sensitivities"] += 1

    @staticmethod
    def network(root: nn.Module) -> tuple:
        """The key of ``root`` as this work knows networks (a pass over its parameters: made once per
        resolution, ``Run.network``, and given to every lookup)."""
        return _network_key(root)

    def outputs(self, network: tuple, batches: Sequence[tuple]) -> list[list[torch.Tensor]] | None:
        """The original's outputs on ``batches`` as an earlier resolution's checker kept them (float32, at most
        ``REFERENCE_BYTES`` of whole batches), or None. ``network``: ``SharedWork.network(root)``."""
        key = (network, _data_key(batches))
        with self._lock:
            found = self._outputs.get(key)
        return None if found is None else list(found)

    def keep_outputs(self, network: tuple, batches: Sequence[tuple], outputs: Sequence[list[torch.Tensor]]) -> None:
        """Keep a checker's reference outputs on ``batches`` (the same tensors: no copy while it lives)."""
        key = (network, _data_key(batches))
        with self._lock:
            if key not in self._outputs:
                self._outputs[key] = list(outputs)
                self.counts["reference outputs"] += 1

    def original_metric(self, network: tuple, metric: Any, compute: Callable[[], float]) -> float:
        """The task metric of the original network: kept for this ``network`` key and this ``Metric`` object,
        else ``compute()``."""
        key = (network, id(metric))
        with self._lock:
            found = self._metric.get(key)
        if found is not None and found[0] is metric:  # the object itself is kept, so its id is not reused
            return found[1]
        value = compute()
        with self._lock:
            self._metric[key] = (metric, value)
            self.counts["original metric"] += 1
        return value

    def metric_value(self, metric: Any) -> float | None:
        """The original's task metric kept for this ``Metric`` object (one network per ``SharedWork``, as a sweep
        has), or None when none was evaluated."""
        with self._lock:
            values = [value for kept, value in self._metric.values() if kept is metric]
        return values[0] if len(values) == 1 else None

    def provide_latency_model(self, latency: Any, model: Any) -> None:
        """Use ``model`` (a ``LatencyModel``, e.g. ``convfactor.remote_timing.remote_latency_model``'s) for every
        resolution given these latency options."""
        with self._lock:
            self._latency[repr(latency)] = model

    def latency_model(self, latency: Any, make: Callable[[], Any]) -> Any:
        """One ``LatencyModel`` per set of latency options (its measured variants are reused)."""
        key = repr(latency)
        with self._lock:
            if key not in self._latency:
                self._latency[key] = make()
            return self._latency[key]


def _snapshot(plan: Any) -> _Scored:
    return _Scored([dataclasses.replace(o) for o in plan.options], list(plan.dropped), list(plan.notes),
                   plan.decision, plan.original.latency_ms, plan.sensitivity)


def _restore(plan: Any, kept: _Scored) -> None:
    plan.options = [dataclasses.replace(o) for o in kept.options]
    plan.dropped = list(kept.dropped)
    plan.notes = list(kept.notes)
    if kept.decision is not None:  # left as is by the scoring (no candidate cheaper or faster), and why
        apply_choices([plan], {plan.name: Choice(None, kept.decision)})
    plan.original.latency_ms = kept.original_latency_ms
    plan.sensitivity = kept.sensitivity
    plan.probe = None


def _count_errors(memo: Mapping[str, Mapping[str, Any]]) -> int:
    # list() copies a view at once (a resolution in another thread may add to the memo meanwhile)
    return sum(len(kept.errors) for layer in list(memo.values()) for kept in list(layer.values()))


def _network_key(root: nn.Module) -> tuple:
    """The parameters' names, shapes and a checksum of their values (the network as it is resolved). The
    checksums read the values in index order: a sum over a channels-last weight (``conv_layout``, chosen per
    resolution by timing) rounds differently, and the same network would miss its own kept work."""
    with torch.no_grad():
        return tuple((name, tuple(p.shape), *_checksums(p))
                     for name, p in root.state_dict().items() if torch.is_tensor(p) and p.is_floating_point())


def _data_key(batches: Sequence[tuple]) -> tuple:
    """The fit samples' count, shapes and checksums."""
    with torch.no_grad():
        return tuple(tuple((tuple(t.shape), *_checksums(t)) for t in batch) for batch in batches)


def _checksums(t: torch.Tensor) -> tuple[float, float]:
    values = t.contiguous().double()
    return float(values.sum()), float(values.abs().sum())


def _options_key(opts: AutoOptions) -> tuple:
    return tuple(copy.deepcopy(getattr(opts, name)) for name in _SHAPING)
