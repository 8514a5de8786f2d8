"""The modules an allocation really gets: what the whole-model checks measure and the result returns.

    no calibration data          -> each layer decomposed from its weight (``method.decompose``)
    calibration, not sequential  -> data-aware factors from the layer's statistics (``layer_factorizer``)
    calibration, sequential      -> refit in execution order on the inputs the partially factorized
                                    network gives each layer (``corrected_weight``), so errors do not
                                    accumulate

A sequentially refit layer depends on the choices of every layer before it, so its module is cached
under that prefix of choices: the fidelity search's probes share the prefixes they have in common, and
the model returned is the last probe's modules, not a new fit. The original network's inputs of each
layer on the refit samples are read in one pass and kept (within REFERENCE_INPUT_BYTES), so each refit
runs only the partially factorized network up to its layer: about half a network pass per refit layer.
In a traced network that calls each layer at one node, a build instead advances one run per sample of
each network through the graph (``FrontierInputs``), refitting each layer when its run reaches it: one
pass of each network per build, whatever the layer count, holding the values live across the current
node for every refit sample (at most FRONTIER_BYTES + REFERENCE_INPUT_BYTES for the two, measured on one
sample before; else the per-layer passes). Both give the same inputs, so the same modules.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from passes.modules import set_submodule

from ...methods import get_method
from ...progress import track
from ..deadline import Deadline
from ..fits.data_aware import corrected_weight, grouped_weight
from ..fits.registry import layer_factorizer
from ..options import AutoOptions
from ..selection.plans import LayerPlan, pass_samples
from ..statistics.calibration import execution_order
from ..statistics.paired import FrontierInputs, LayerInput, PrefixInputs, paired_statistics
from ..statistics.split import first_samples
from ..statistics.suffix import FRONTIER_BYTES

__all__ = ["Replacements", "REFERENCE_INPUT_BYTES"]

REFERENCE_INPUT_BYTES = 256 * 2**20  # the original's layer inputs kept across probes, at most


class Replacements:
    """Builds the replacement modules of the plans' current choices (``plan.chosen``), cached across calls.

    Args:
        root: the (BatchNorm-folded) original network; not modified.
        plans: the resolution's plans (only open ones are ever replaced).
        opts: ``AutoOptions`` (damping, rows, seed, sequential).
        batches: calibration batches, or None.
        inputs: example inputs (the execution order of the layers).
        stats: {layer: LayerStatistics} for per-layer data-aware factors (not needed when sequential).
        forms: {layer: statistic form} of the sequential refit (default "full").
        deadline: the time budget; once spent, a sequential build decomposes the remaining layers from
            their weights (and says so through the deadline).
    """

    def __init__(self, root: nn.Module, plans: list[LayerPlan], opts: AutoOptions, *, batches: list | None = None,
                 inputs: tuple | None = None, stats: dict | None = None, forms: dict[str, str] | None = None,
                 deadline: Deadline | None = None):
        self.root, self.opts, self.stats, self.forms = root, opts, stats, forms or {}
        self.plans = {p.name: p for p in plans if p.open}
        self.sequential = batches is not None and opts.sequential
        self.batches = batches
        self.inputs = inputs
        self.deadline = deadline
        self.cache: dict[Any, nn.Module] = {}
        self.fits = self.builds = 0
        self.seconds = 0.0
        self.used: int | None = None  # calibration samples of the sequential refit
        self.weight_only: set[str] = set()  # layers decomposed from weights after the time budget ran out
        self._order: list[str] | None = None
        self._work: nn.Module | None = None
        self._originals: dict[str, nn.Module] = {}
        self._reference: dict[str, dict[int, Any]] = {}
        self._reference_bytes = 0
        self.frontier = False  # whether builds advance one run per sample (``FrontierInputs``)

    def build(self, progress: bool = False) -> dict[str, nn.Module]:
        """{layer: module} for every open plan with a choice, in eval mode (shared with the cache: not to be
        modified)."""
        started = time.perf_counter()
        self.builds += 1
        try:
            if self.sequential:
                return self._sequential(progress)
            return {name: self._single(plan) for name, plan in self.plans.items() if plan.chosen is not None}
        finally:
            self.seconds += time.perf_counter() - started

    def choice(self) -> tuple:
        """The current allocation, as a hashable key."""
        return tuple((name, None if p.chosen is None else (p.chosen.method, p.chosen.rank))
                     for name, p in self.plans.items())

    def _single(self, plan: LayerPlan) -> nn.Module:
        option = plan.chosen
        key = (plan.name, option.method, option.rank)
        module = self.cache.get(key)
        if module is None:
            self.fits += 1
            factorizer = None
            if self.stats is not None and plan.name in self.stats:
                factorizer = layer_factorizer(option.method, plan.layer, self.stats[plan.name].covariance,
                                              self.opts.damping)
            module = (get_method(option.method).decompose(plan.layer, option.rank) if factorizer is None
                      else factorizer.module(option.rank)).eval()
            self.cache[key] = module
        return module

    def _sequential(self, progress: bool) -> dict[str, nn.Module]:
        chosen = [name for name, p in self.plans.items() if p.chosen is not None]
        if not chosen:
            return {}
        if self._work is None:
            self._order = execution_order(self.root, list(self.plans), self.inputs)
            self._work = copy.deepcopy(self.root).eval()
            self._originals = {name: self._work.get_submodule(name) for name in self.plans}
            # Each refit runs the network up to its layer (about one full pass per layer in all): the
            # first allocation's layer count fixes the samples, the same for every later build.
            self.used = pass_samples(list(self.plans.values()), len(chosen), sum(len(b[0]) for b in self.batches))
            self.batches = first_samples(self.batches, self.used)
            self.frontier = self._frontier_fits()
            if not self.frontier:
                self._prefill_reference()
        work, built, prefix = self._work, {}, ()
        sources: tuple[LayerInput, LayerInput] | None = None  # made at this build's first refit
        for name in track(self._order, progress, "refit"):
            plan = self.plans[name]
            option = plan.chosen
            prefix += ((name, None if option is None else (option.method, option.rank)),)
            if option is None:
                set_submodule(work, name, self._originals[name])
                continue
            module = self.cache.get(prefix)
            if module is None:
                sources = sources or self._sources(work)
                module = self.cache[prefix] = self._refit(work, plan, sources, progress)
            set_submodule(work, name, module)
            built[name] = module
        self._trim(prefix)
        return built

    def _frontier_fits(self) -> bool:
        """Whether both networks' runs of every refit sample fit FRONTIER_BYTES + REFERENCE_INPUT_BYTES."""
        if not FrontierInputs.usable(self._work, self._order):
            return False
        held = 2 * FrontierInputs(self._work, self._order, self.batches).frontier_bytes()
        return held <= FRONTIER_BYTES + REFERENCE_INPUT_BYTES

    def _sources(self, work: nn.Module) -> tuple[LayerInput, LayerInput]:
        """Where one build reads each layer's input in the original and in ``work``."""
        if self.frontier:
            return FrontierInputs(self.root, self._order, self.batches), FrontierInputs(work, self._order, self.batches)
        return PrefixInputs(self.root), PrefixInputs(work)

    @torch.no_grad()
    def _prefill_reference(self) -> None:
        """The original's input of every layer on the refit samples, from one pass (within the byte cap)."""
        stored: dict[str, dict[int, torch.Tensor]] = {name: {} for name in self._order}
        index = [0]

        def hook_for(name: str):
            def hook(module, args):
                x = args[0]
                size = x.numel() * x.element_size()
                if index[0] not in stored[name] and self._reference_bytes + size <= REFERENCE_INPUT_BYTES:
                    stored[name][index[0]] = x  # the first call's input, as paired_statistics reads it
                    self._reference_bytes += size
            return hook

        handles = [self.root.get_submodule(name).register_forward_pre_hook(hook_for(name)) for name in self._order]
        try:
            for index[0], batch in enumerate(self.batches):
                self.root(*batch)
        finally:
            for handle in handles:
                handle.remove()
        self._reference = {name: got for name, got in stored.items() if len(got) == len(self.batches)}
        self._reference_bytes = sum(t.numel() * t.element_size() for got in self._reference.values()
                                    for t in got.values())

    def _refit(self, work: nn.Module, plan: LayerPlan, sources: tuple[LayerInput, LayerInput],
               progress: bool | str = False) -> nn.Module:
        option = plan.chosen
        if self.deadline is not None and self.deadline.spent():
            self.weight_only.add(plan.name)
            self.deadline.cut("sequential refit", "stopped: the remaining layers were decomposed from their "
                              "weights (no data-aware refit)")
            return get_method(option.method).decompose(plan.layer, option.rank).eval()
        self.fits += 1
        opts = self.opts
        cache = self._reference.get(plan.name)
        fresh = cache is None and not self.frontier and self._reference_bytes < REFERENCE_INPUT_BYTES
        if fresh:
            cache = {}
        groups = getattr(plan.layer, "groups", 1)
        original = grouped_weight(plan.layer.weight, groups)
        sigma, cross = paired_statistics(plan.layer, plan.name, self.batches, *sources, opts.max_rows, opts.seed,
                                         self.forms.get(plan.name, "full"), reference_inputs=cache,
                                         weight=original)
        if fresh:  # the original's inputs of this layer, for the next probes (within the byte cap)
            self._reference[plan.name] = cache
            self._reference_bytes += sum(t.numel() * t.element_size() for t in cache.values())
        weight = corrected_weight(original, sigma, cross, opts.damping)
        factorizer = layer_factorizer(option.method, plan.layer, sigma, opts.damping, weight=weight,
                                      progress=progress)
        if factorizer is None:
            return get_method(option.method).decompose(plan.layer, option.rank).eval()
        return factorizer.module(option.rank).eval()

    def _trim(self, keep: tuple) -> None:
        """Keep the cache within about the original layers' size: drop entries the last build did not use."""
        limit = sum(sum(t.numel() * t.element_size() for t in p.layer.parameters()) for p in self.plans.values())
        held = sum(sum(t.numel() * t.element_size() for t in m.parameters()) for m in self.cache.values())
        if held <= 2 * limit:
            return
        used = {keep[:i + 1] for i in range(len(keep))}
        for key in [k for k in self.cache if k not in used]:
            del self.cache[key]
