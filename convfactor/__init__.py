"""convfactor: factorize the convolutions of trained PyTorch networks, then measure the result."""

__version__ = "0.1.0"

from .api import factorize, get_report  # noqa: E402
from .errors import ConvfactorError, PolicyError, RankError, TraceError  # noqa: E402
from .methods import available_methods, get_method  # noqa: E402
from .policy import Policy, Rule  # noqa: E402
from .report import FactorizeReport, LayerDecision  # noqa: E402

__all__ = [
    "__version__",
    "factorize",
    "get_report",
    "Policy",
    "Rule",
    "FactorizeReport",
    "LayerDecision",
    "available_methods",
    "get_method",
    "ConvfactorError",
    "PolicyError",
    "RankError",
    "TraceError",
]
