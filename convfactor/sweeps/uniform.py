"""A sweep's uniform baseline: one method at one rank fraction on every layer, from the weights alone.

At each MACs point the baseline is the rank fraction whose uniform model costs the most MACs not above the
point (``points.uniform_rank``, a bisection). The bisection reads planned MACs, not built models: the
network is traced once the way ``factorize`` traces it (``run_pipeline``: capture, shapes, BatchNorm
folded), and each fraction's layers are decided by ``decide_layers`` (the rule, ranks and the
``only_if_cheaper`` skip ``factorize`` applies) and costed by ``replacement_costs`` on meta-device twins. Only
the chosen fraction is decomposed, by ``factorize``; its report's MACs are what the sweep shows.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

from torch import nn

from passes.manager import PassResult

from ..api import factorize
from ..auto.search.verify import ConvfactorWarning
from ..costs import per_layer_macs, replacement_costs
from ..decisions import decide_layers
from ..pipeline import run_pipeline
from ..policy import Policy
from .points import uniform_rank

__all__ = ["UniformPlanner", "uniform_model", "uniform_policy"]

_PIPELINE_KEYS = ("trace", "fold_batchnorm", "leaf_modules", "concrete_args")


def uniform_policy(method: str, rank: float) -> str:
    """The policy text of ``method`` at rank fraction ``rank``: always with a decimal point, since
    ``method:1`` would be the absolute rank 1."""
    return f"{method}:{rank:.6f}"


class UniformPlanner:
    """Planned MACs fraction of ``method`` at a rank fraction on ``model`` (traced once here).

    Args:
        model: the network (not modified).
        inputs: the example input tuple.
        extra: the ``factorize`` keywords the sweep passes (only the tracing ones are read).
    """

    def __init__(self, model: nn.Module, inputs: tuple, extra: Mapping[str, Any]):
        options = {key: extra[key] for key in _PIPELINE_KEYS if key in extra}
        work = copy.deepcopy(model).eval()
        self.before = float(sum(per_layer_macs(work, inputs).values()))
        seen: dict[str, Any] = {}

        def keep(root: nn.Module, shapes: Any, folded: Any) -> PassResult:
            seen.update(root=root, shapes=shapes)
            return PassResult(root, False, [], "factorize_layers")

        run_pipeline(work, keep, example_inputs=inputs, **options)
        self.root, self.shapes = seen["root"], seen["shapes"]

    def macs_fraction(self, method: str, rank: float) -> float:
        """MACs after / before of ``method`` at rank fraction ``rank`` on every layer it applies to."""
        _, todo = decide_layers(self.root, Policy.from_any(uniform_policy(method, rank)), self.shapes)
        saved = 0.0
        for decision, layer, chosen, layer_rank in todo:
            in_out = self.shapes.get(decision.name)
            macs, _ = replacement_costs(chosen, layer, layer_rank, in_out[0] if in_out else None)
            if macs is not None and decision.macs_before is not None:
                saved += decision.macs_before - macs
        return (self.before - saved) / self.before if self.before else 1.0


def uniform_model(model: nn.Module, method: str, fraction: float, inputs: tuple,
                  extra: Mapping[str, Any], planner: UniformPlanner | None = None) -> tuple[nn.Module, float]:
    """The uniform weight-only model at MACs fraction ``fraction`` (at most, where one reaches it), and its rank
    fraction; ``planner`` (one per sweep) traces the network once for every point."""
    planner = planner or UniformPlanner(model, inputs, extra)
    rank, _ = uniform_rank(lambda r: planner.macs_fraction(method, r), fraction)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvfactorWarning)
        return factorize(model, uniform_policy(method, rank), inputs, **extra), rank
