"""torch.fx passes of convfactor. Each pass is a function GraphModule (+ what it needs) -> PassResult.

    capture            nn.Module -> GraphModule (symbolic trace with leaf modules / concrete args)
    annotate_shapes    runs example inputs, records each node's output shape
    fold_batchnorm     conv/linear -> BatchNorm (eval) becomes one layer with a bias
    factorize_layers   puts the module the caller builds in place of each layer it names
    cleanup            dead-code elimination, unused submodules, lint, recompile

Dependency direction: ``convfactor`` imports ``passes``; ``passes`` never imports ``convfactor``
(tests/passes/test_dependency_direction.py checks it). The passes are generic torch.fx passes: what to
replace, with what, is the caller's (``convfactor.decisions``, ``convfactor.pipeline``).
"""

from .annotate_shapes import annotate_shapes
from .capture import FactorizeTracer, capture
from .cleanup import cleanup
from .errors import CaptureError, PassInputError, TracedArgumentError
from .factorize_layers import factorize_layers
from .fold_batchnorm import fold_batchnorm
from .manager import PassFailed, PassResult, run_passes
from .modules import set_submodule

__all__ = [
    "PassResult",
    "PassFailed",
    "run_passes",
    "PassInputError",
    "CaptureError",
    "TracedArgumentError",
    "set_submodule",
    "capture",
    "FactorizeTracer",
    "annotate_shapes",
    "fold_batchnorm",
    "factorize_layers",
    "cleanup",
]
