"""Acting on an overfit: choose the data-aware fit's regularization by held-out error, not in-sample error.

A data-aware factorization minimizes each layer's output error on the fit samples. With few or narrow
samples it can fit them far better than anything else (held-out error many times the in-sample one), and
its in-sample error then says nothing. When the returned model's error on the select samples is more than
``OVERFIT_RATIO`` times its error on the fit samples (and above ``OVERFIT_FLOOR``), the same allocation is
rebuilt with a stronger ridge (``damping`` x10, x100) and from the weights alone (no data-aware fit), and
the build with the lowest select error is kept. Under a fidelity bound, a build that fails it on the select
samples (the user's metric included: the search chose the allocation because its build held the bound)
never replaces one that holds it, whatever its output error; where the metric's search evaluations are
spent, a build's standing is unknown and ranks between the two. The check samples stay unseen: the
reported held-out number is measured afterwards (``convfactor.auto.search.verify``). At most
``len(FACTORS) + 1`` rebuilds, each as costly as the first build; the time budget stops them.
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

    def standing(modules: dict[str, nn.Module], measured: dict[str, Any]) -> tuple[bool | None, list[str]]:
        """Whether the build holds ``bound`` on the select samples (None: its metric was not evaluated)."""
        if bound is None:
            return None, []
        if bound.needs_metric:
            if select.metric is None or select.metric_calls >= select.metric_limit:
                return None, []
            measured = {**measured, **select.evaluate_metric(model(modules))}
        failed = failures(measured, bound)
        return not failed, failed

    first = select.measure(model(prebuilt))
    held, inside = float(first["rel_error"]), error(prebuilt, fit)
    if not (held > OVERFIT_RATIO * inside and held > OVERFIT_FLOOR):
        return prebuilt, None
    holds, failed = standing(prebuilt, first)
    tried = [{"fit": f"damping {opts.damping:g}", "select_error": rounded(held, 5),
              "in_sample_error": rounded(inside, 5), **_standing_fields(bound, holds, failed)}]
    best, best_key, best_label = prebuilt, (STANDING[holds], held), tried[0]["fit"]
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
            holds, failed = standing(modules, metrics)
            tried.append({"fit": label, "select_error": rounded(metrics["rel_error"], 5),
                          **_standing_fields(bound, holds, failed)})
            key = (STANDING[holds], float(metrics["rel_error"]))
            if key < best_key:
                best, best_key, best_label = modules, key, label
            bar.update()
    ratio = held / max(inside, 1e-300)
    notes.append(f"the data-aware fit overfit its samples (selection error {held:.4g}, {ratio:.1f}x "
                 f"the in-sample {inside:.4g}): kept {best_label} (selection error {best_key[1]:.4g}) of "
                 + ", ".join(f"{t['fit']} {t['select_error']:.4g}{_standing_text(t)}" for t in tried))
    return best, {"overfit_ratio": rounded(held / inside, 4) if inside > 0 else None, "tried": tried,
                  "kept": best_label}


def _standing_fields(bound: Fidelity | None, holds: bool | None, failed: list[str]) -> dict[str, Any]:
    if bound is None:
        return {}
    return {"holds_bound": holds, **({"fails": "; ".join(failed)} if failed else {})}


def _standing_text(tried: dict[str, Any]) -> str:
    if "holds_bound" not in tried:
        return ""
    if tried["holds_bound"] is None:
        return " (bound not measured: the metric's search evaluations are spent)"
    return "" if tried["holds_bound"] else f" (fails the bound: {tried['fails']})"
