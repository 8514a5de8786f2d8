"""Acting on an overfit: choose the data-aware fit's regularization by held-out error, not in-sample error.

A data-aware factorization minimizes each layer's output error on the fit samples. With few or narrow
samples it can fit them far better than anything else (held-out error many times the in-sample one), and
its in-sample error then says nothing. When the returned model's error on the select samples is more than
``OVERFIT_RATIO`` times its error on the fit samples (and above ``OVERFIT_FLOOR``), the same allocation is
rebuilt with a stronger ridge (``damping`` x10, x100) and from the weights alone (no data-aware fit), and
the build with the lowest select error is kept. Under a fidelity bound, a build that fails it on the select
samples (the user's metric included: the search chose the allocation because its build held the bound)
never replaces one that holds it, whatever its output error; where the metric's search evaluations are
spent, a build's standing is unknown and ranks between the two. A build's metric is evaluated only where
the order needs it (a rebuild with a higher select error than a build that holds the bound cannot win).
The check samples stay unseen: the reported held-out number is measured afterwards
(``convfactor.auto.search.verify``). At most ``len(FACTORS) + 1`` rebuilds, each as costly as the first
build; the time budget stops them.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from torch import nn

from ...fidelity_spec import Fidelity
from ...output_checker import OutputChecker, failures, rounded
from ...progress import phase
from ..deadline import Deadline
from ..options import AutoOptions
from .measured import install
from .refit import Replacements
from .verify import OVERFIT_FLOOR, OVERFIT_RATIO

__all__ = ["regularize", "FACTORS"]

FACTORS = (10.0, 100.0)  # damping multipliers tried on an overfit, before the weights-only build
STANDING = {True: 0, None: 1, False: 2}  # holds the bound, unknown (metric not evaluated), fails it


def regularize(root: nn.Module, plans: list, opts: AutoOptions, replacements: Replacements,
               prebuilt: dict[str, nn.Module], checks: dict[str, OutputChecker | None], notes: list[str],
               deadline: Deadline | None = None, progress: bool = False,
               bound: Fidelity | None = None) -> tuple[dict[str, nn.Module], Any]:
    """The modules to return and the account (None when no overfit was measured or nothing could be).
    ``bound``: the resolution's fidelity bound (None: the select error alone decides)."""
    fit, select = checks.get("fit"), checks.get("select")
    if not prebuilt or fit is None or select is None or fit is select:
        return prebuilt, None
    open_plans = [p for p in plans if p.open]

    def model(modules: dict[str, nn.Module]) -> nn.Module:
        work = copy.deepcopy(root).eval()
        originals = {p.name: work.get_submodule(p.name) for p in open_plans}
        return install(work, open_plans, modules, originals)

    def error(modules: dict[str, nn.Module], checker: OutputChecker) -> float:
        return float(checker.measure(model(modules))["rel_error"])

    def settle(build: _Build) -> int:
        """The build's standing under ``bound`` (``STANDING``), its metric evaluated at the first need."""
        if build.rank is None:
            assert bound is not None
            failed = failures(build.metrics, bound)  # the output error and agreement criteria
            if not failed and bound.needs_metric and select.metric_left:
                failed = failures({**build.metrics, **select.evaluate_metric(model(build.modules))}, bound)
                holds: bool | None = not failed
            elif failed or not bound.needs_metric:
                holds = not failed
            else:  # the metric is needed and none of its evaluations is left
                holds = None
            build.rank = STANDING[holds]
            build.entry.update(holds_bound=holds, **({"fails": "; ".join(failed)} if failed else {}))
        return build.rank

    first = select.measure(model(prebuilt))
    held, inside = float(first["rel_error"]), error(prebuilt, fit)
    if not (held > OVERFIT_RATIO * inside and held > OVERFIT_FLOOR):
        return prebuilt, None
    tried = [{"fit": f"damping {opts.damping:g}", "select_error": rounded(held, 5),
              "in_sample_error": rounded(inside, 5)}]
    best = _Build(tried[0]["fit"], prebuilt, first, tried[0])
    variants: list[tuple[str, Replacements]] = []
    for factor in FACTORS:
        damping = opts.damping * factor
        variants.append((f"damping {damping:g}", Replacements(
            root, plans, dataclasses.replace(opts, damping=damping), batches=replacements.batches,
            inputs=replacements.inputs, stats=replacements.stats, forms=replacements.forms, deadline=deadline)))
    variants.append(("weights only (no data-aware fit)", Replacements(root, plans, opts, inputs=replacements.inputs)))
    with phase(progress, "regularization", total=len(variants)) as bar:
        for label, variant in variants:
            if deadline is not None and deadline.spent():
                deadline.cut("regularization", f"stopped after {len(tried) - 1} of {len(variants)} rebuilds")
                break
            modules = variant.build()
            metrics = select.measure(model(modules))
            tried.append({"fit": label, "select_error": rounded(metrics["rel_error"], 5)})
            build = _Build(label, modules, metrics, tried[-1])
            if _beats(build, best, settle if bound is not None else None):
                best = build
            bar.update()
    ratio = held / max(inside, 1e-300)
    notes.append(f"the data-aware fit overfit its samples (selection error {held:.4g}, {ratio:.1f}x "
                 f"the in-sample {inside:.4g}): kept {best.label} (selection error {best.error:.4g}) of "
                 + ", ".join(f"{t['fit']} {t['select_error']:.4g}{_standing_text(t)}" for t in tried))
    return best.modules, {"overfit_ratio": rounded(held / inside, 4) if inside > 0 else None, "tried": tried,
                          "kept": best.label}


@dataclasses.dataclass
class _Build:
    """One build of the allocation: its modules, its select measurement, its account entry, and its
    ``STANDING`` under the bound once settled (None: not yet)."""

    label: str
    modules: dict[str, nn.Module]
    metrics: dict[str, Any]
    entry: dict[str, Any]
    rank: int | None = None

    @property
    def error(self) -> float:
        return float(self.metrics["rel_error"])


def _beats(build: _Build, best: _Build, settle: Any) -> bool:
    """Whether ``build`` ranks before ``best`` by (standing under the bound, select error); ``settle`` gives
    a build's standing, evaluating the metric only where the order needs it (None: no bound, error alone)."""
    if settle is None:
        return build.error < best.error
    if build.error < best.error:
        return settle(build) == 0 or settle(build) <= settle(best)
    return settle(best) != 0 and settle(build) < settle(best)


def _standing_text(tried: dict[str, Any]) -> str:
    if "holds_bound" not in tried:
        return ""
    if tried["holds_bound"] is None:
        return " (bound not measured: the metric's search evaluations are spent)"
    return "" if tried["holds_bound"] else f" (fails the bound: {tried['fails']})"
