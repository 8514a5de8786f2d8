"""Acting on an overfit: choose the data-aware fit's regularization by held-out error, not in-sample error.

A data-aware factorization minimizes each layer's output error on the fit samples. With few or narrow
samples it can fit them far better than anything else (held-out error many times the in-sample one), and
its in-sample error then says nothing. When the returned model's error on the select samples is more than
``OVERFIT_RATIO`` times its error on the fit samples (and above ``OVERFIT_FLOOR``), the same allocation is
rebuilt with a stronger ridge (``damping`` x10, x100) and from the weights alone (no data-aware fit), and
the build with the lowest select error is kept. The check samples stay unseen: the reported held-out
number is measured afterwards (``convfactor.auto.search.verify``). At most ``len(FACTORS) + 1`` rebuilds, each as
costly as the first build; the time budget stops them.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from torch import nn

from ...output_checker import OutputChecker, rounded
from ...progress import phase
from ..deadline import Deadline
from ..options import AutoOptions
from .measured import install
from .refit import Replacements
from .verify import OVERFIT_FLOOR, OVERFIT_RATIO

__all__ = ["regularize", "FACTORS"]

FACTORS = (10.0, 100.0)  # damping multipliers tried on an overfit, before the weights-only build


def regularize(root: nn.Module, plans: list, opts: AutoOptions, replacements: Replacements,
               prebuilt: dict[str, nn.Module], checks: dict[str, OutputChecker | None], notes: list[str],
               deadline: Deadline | None = None, progress: bool = False) -> tuple[dict[str, nn.Module], Any]:
    """The modules to return and the account (None when no overfit was measured or nothing could be)."""
    fit, select = checks.get("fit"), checks.get("select")
    if not prebuilt or fit is None or select is None or fit is select:
        return prebuilt, None
    open_plans = [p for p in plans if p.open]

    def error(modules: dict[str, nn.Module], checker: OutputChecker) -> float:
        work = copy.deepcopy(root).eval()
        originals = {p.name: work.get_submodule(p.name) for p in open_plans}
        return float(checker.measure(install(work, open_plans, modules, originals))["rel_error"])

    held, inside = error(prebuilt, select), error(prebuilt, fit)
    if not (held > OVERFIT_RATIO * inside and held > OVERFIT_FLOOR):
        return prebuilt, None
    tried = [{"fit": f"damping {opts.damping:g}", "select_error": rounded(held, 5),
              "in_sample_error": rounded(inside, 5)}]
    best, best_error, best_label = prebuilt, held, tried[0]["fit"]
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
            measured = error(modules, select)
            tried.append({"fit": label, "select_error": rounded(measured, 5)})
            if measured < best_error:
                best, best_error, best_label = modules, measured, label
            bar.update()
    ratio = held / max(inside, 1e-300)
    notes.append(f"the data-aware fit overfit its samples (selection error {held:.4g}, {ratio:.1f}x "
                 f"the in-sample {inside:.4g}): kept {best_label} (selection error {best_error:.4g}) of "
                 + ", ".join(f"{t['fit']} {t['select_error']:.4g}" for t in tried))
    return best, {"overfit_ratio": rounded(held / inside, 4) if inside > 0 else None, "tried": tried,
                  "kept": best_label}
