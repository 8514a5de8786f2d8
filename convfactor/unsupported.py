"""Conv and Linear layers convfactor leaves as they are, each with its reason, for the report's table.

``candidate_layers`` takes exact Conv1d/Conv2d/Linear types only (a subclass may change ``forward``);
the others would otherwise vanish from the report, and a Conv3d-only model would look like a model
without convolutions. Listing them says what was seen and why it was not rewritten.
"""

from __future__ import annotations

from torch import nn

from .geometry import SUPPORTED_KINDS, layer_kind
from .methods.base import FactorizedLayer
from .report import SKIPPED, LayerDecision

__all__ = ["unsupported_layers", "is_supported_row"]

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _reason(module: nn.Module) -> str | None:
    """Why a conv/linear-like module is not rewritten, or None when it is not one (or is supported)."""
    if layer_kind(module) is not None or isinstance(module, FactorizedLayer):
        return None
    if type(module).__name__ == "NonDynamicallyQuantizableLinear":  # MultiheadAttention's, used through its weight
        return None
    if isinstance(module, _TRANSPOSED):
        if type(module) in _TRANSPOSED:
            return f"unsupported: transposed convolutions ({type(module).__name__}) are not factorized"
        return f"unsupported: a subclass of {_TRANSPOSED[0].__name__[:-2]}, transposed convolutions are not factorized"
    if type(module) is nn.Conv3d:
        return "unsupported: Conv3d (convfactor rewrites Conv1d, Conv2d and Linear)"
    for base in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear):
        if isinstance(module, base):
            return (f"unsupported: a subclass of {base.__name__} ({type(module).__name__}); its forward may differ "
                    f"from {base.__name__}'s, so it is left as is")
    return None


def _shape(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"{module.in_features}->{module.out_features}"
    return f"{module.in_channels}->{module.out_channels} " + "x".join(map(str, module.kernel_size))


def unsupported_layers(root: nn.Module) -> list[LayerDecision]:
    """A skipped ``LayerDecision`` for every Conv/ConvTranspose/Linear-like layer convfactor does not rewrite."""
    inside_factorized: set[str] = set()
    rows = []
    for name, module in root.named_modules():
        if isinstance(module, FactorizedLayer):
            inside_factorized.update(f"{name}.{child}" for child, _ in module.named_modules() if child)
            continue
        reason = None if name in inside_factorized else _reason(module)
        if reason:
            params = sum(p.numel() for p in module.parameters())
            rows.append(LayerDecision(name=name, layer_type=type(module).__name__, shape=_shape(module),
                                      status=SKIPPED, params_before=params, params_after=params, reason=reason))
    return rows


def is_supported_row(decision: LayerDecision) -> bool:
    """Whether a report row is a layer convfactor can rewrite (not one of ``unsupported_layers``)."""
    return decision.layer_type in SUPPORTED_KINDS
