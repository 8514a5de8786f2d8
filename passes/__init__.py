"""torch.fx passes of convfactor. Each pass is a function GraphModule (+ what it needs) -> PassResult.

    capture            nn.Module -> GraphModule (symbolic trace with leaf modules / concrete args)
    annotate_shapes    runs example inputs, records each node's output shape
    fold_batchnorm     conv/linear -> BatchNorm (eval) becomes one layer with a bias
    factorize_layers   replaces each layer the policy matches by its factorized module
    cleanup            dead-code elimination, unused submodules, lint, recompile
"""

from .annotate_shapes import annotate_shapes
from .capture import FactorizeTracer, capture
from .cleanup import cleanup
from .factorize_layers import factorize_layers
from .fold_batchnorm import fold_batchnorm
from .manager import PassFailed, PassResult, run_passes

__all__ = [
    "PassResult",
    "PassFailed",
    "run_passes",
    "capture",
    "FactorizeTracer",
    "annotate_shapes",
    "fold_batchnorm",
    "factorize_layers",
    "cleanup",
]
