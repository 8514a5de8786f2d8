"""The contract every factorization method fulfils, and the registry that finds them by name.

A method is three things:
  1. a pure weight function in its own module: weights in, factor weights out, no nn.Modules;
  2. a small module, a ``FactorizedLayer`` subclass, built from an existing layer by ``from_conv``
     (or with empty weights by ``build``, for reloading a saved plan);
  3. a ``FactorizationMethod`` instance in the registry, which says which layers it can represent
     exactly at full rank (``unsupported_reason``), what its ranks mean and how a rank spec resolves.

Ranks are JSON-able: an int, or a tuple of ints for methods with several (Tucker-2's (r_in, r_out)).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import RankError, UnknownMethodError
from ..geometry import LayerGeometry, layer_kind
from ..ranks import align_rank, check_rank, fraction_to_rank, is_fraction, smallest_rank_for_energy
from ._stages import set_weight

__all__ = [
    "Rank",
    "conv_reason",
    "FactorizedLayer",
    "FactorizationMethod",
    "register",
    "get_method",
    "available_methods",
]

Rank = int | tuple[int, ...]


class FactorizedLayer(nn.Sequential):
    """A chain of plain Conv/Linear layers that together replace one original layer.

    Subclasses name their stages (``nn.Sequential`` with an OrderedDict) so state_dict keys read
    well, e.g. ``layer1.0.conv1.vertical.weight``. Being a Sequential of standard layers, it traces
    with torch.fx, runs under torch.export, and exports to plain ONNX ``Conv``/``Gemm`` nodes.
    """

    method_name: ClassVar[str] = ""

    def __init__(self, stages: dict[str, nn.Module], rank: Rank, geometry: LayerGeometry):
        super().__init__()
        for name, stage in stages.items():
            self.add_module(name, stage)
        self.rank = rank
        self.geometry = geometry

    @classmethod
    def empty(cls, layer: nn.Module, rank: Rank) -> FactorizedLayer:
        """The structure for ``layer`` at ``rank``, weights uninitialized (dtype and device of the layer)."""
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The weight of a single layer equivalent to this chain (shape of the original weight)."""
        raise NotImplementedError

    def structural_zeros(self) -> dict[str, torch.Tensor]:
        """The entries the method fixes at zero (a pruning form's zeros, counted as p_u): {parameter name
        (e.g. ``"conv.weight"``): bool mask of its shape, True at a fixed zero}. ``convfactor.auto.finetune``
        keeps them zero. None by default."""
        return {}

    def dense_bias(self) -> torch.Tensor | None:
        """The bias of the equivalent single layer: the last stage carries it."""
        last = self[-1]
        return None if last.bias is None else last.bias.detach()

    @classmethod
    def from_conv(cls, layer: nn.Module, rank: Any = 1.0, energy: float | None = None) -> FactorizedLayer:
        """Factorize ``layer`` with this module's method (rank spec as in a policy rule)."""
        method = get_method(cls.method_name)
        reason = method.unsupported_reason(layer)
        if reason:
            raise RankError(f"{method.name} cannot represent this layer: {reason}")
        return method.decompose(layer, method.resolve_rank(layer, rank=rank, energy=energy))

    def load_factors(self, weights: Sequence[torch.Tensor], layer: nn.Module) -> FactorizedLayer:
        """Copy float64 factors into the stages that have weights, in order, casting to their dtype and device;
        the last takes ``layer``'s bias. Returns the module."""
        stages = [stage for stage in self.children() if isinstance(getattr(stage, "weight", None), torch.Tensor)]
        bias = None if layer.bias is None else layer.bias.detach()
        for index, (stage, weight) in enumerate(zip(stages, weights, strict=True)):
            set_weight(stage, weight, bias if index == len(stages) - 1 else None)
        return self

    def extra_repr(self) -> str:
        return f"method={self.method_name}, rank={self.rank}"


ALREADY_DEPTHWISE = "already depthwise (groups == in_channels): nothing to factorize across channels"


def conv_reason(method_name: str, layer: nn.Module, *, pointwise: str | None = None, grouped: str | None = None,
                allow_depthwise: bool = False) -> str | None:
    """Why a method that rewrites a Conv1d/Conv2d cannot take ``layer``, or None: the one check every conv
    method's ``unsupported_reason`` makes, with the method's own wording for what it refuses.

    Args:
        method_name: named in the type message.
        pointwise: the reason a 1x1 conv is refused; None accepts it.
        grouped: the reason a grouped conv is refused, ``{groups}`` filled in; None accepts it.
        allow_depthwise: accept an already depthwise conv (groups == in_channels).
    """
    if layer_kind(layer) not in ("Conv1d", "Conv2d"):
        return f"{method_name} factorizes Conv1d/Conv2d, not {type(layer).__name__} (use svd)"
    geo = LayerGeometry.of(layer)
    if geo.is_depthwise and not allow_depthwise:
        return ALREADY_DEPTHWISE
    if grouped is not None and geo.groups > 1:
        return grouped.format(groups=geo.groups)
    if pointwise is not None and geo.kernel_volume == 1:
        return pointwise
    return None


class FactorizationMethod(abc.ABC):
    """One factorization family. Subclasses set ``name``, ``rank_meaning`` and implement the hooks."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line of math, shown by `convfactor methods` and the README
    rank_meaning: ClassVar[str]  # what an int rank means for this method
    module_cls: ClassVar[type[FactorizedLayer]]  # its module; ``module_cls.empty(layer, rank)`` builds it
    rank_components: ClassVar[tuple[str, ...]] = ("rank",)  # names of the rank's components, for messages
    # A pruning form (sal) keeps the layer's shape and saves zeros (p_u), not MACs: only_if_cheaper keeps it.
    pruning: ClassVar[bool] = False

    # -- which layers -------------------------------------------------------------------------
    @abc.abstractmethod
    def unsupported_reason(self, layer: nn.Module) -> str | None:
        """None if the method represents ``layer`` exactly at full rank, else the reason it cannot."""

    def reduces_to(self, layer: nn.Module) -> str | None:
        """The method whose candidates on ``layer`` are this one's at no higher cost (the same approximation,
        or a better one for the cost), or None. ``method: auto`` leaves this one out where that one is open:
        scoring both costs time and leaves a choice between equals to float rounding."""
        return None

    # -- ranks --------------------------------------------------------------------------------
    @abc.abstractmethod
    def full_rank(self, layer: nn.Module) -> Rank:
        """The rank at which the factorization is exact."""

    def spectra(self, layer: nn.Module) -> list[np.ndarray]:
        """Singular values (decreasing) that ``energy`` is measured on, one array per rank component.

        Methods without a spectrum override ``rank_from_energy`` instead.
        """
        raise RankError(f"{self.name} has no singular-value spectrum; give a rank instead of energy")

    def rank_from_energy(self, layer: nn.Module, energy: float) -> Rank:
        ranks = tuple(smallest_rank_for_energy(s, energy) for s in self.spectra(layer))
        return ranks[0] if len(ranks) == 1 else ranks

    def resolve_rank(
        self,
        layer: nn.Module,
        rank: Any = None,
        energy: float | None = None,
        align: int | None = None,
    ) -> Rank:
        """Turn a policy's rank spec into a concrete, validated rank for ``layer``.

        Args:
            rank: int or tuple (absolute), float in (0, 1] (fraction of full rank), or None.
            energy: fraction of squared singular values to keep (exclusive with ``rank``).
            align: round each rank component up to this multiple (capped at the full rank).
        Raises:
            RankError: naming the method, the component and its valid range.
        """
        if rank is not None and energy is not None:
            raise RankError(f"{self.name}: give either rank or energy, not both")
        full = self.full_rank(layer)
        fulls = full if isinstance(full, tuple) else (full,)
        names = self.rank_component_names()
        if energy is not None:
            is_number = isinstance(energy, (int, float, np.integer, np.floating)) and not isinstance(energy, bool)
            if not (is_number and 0 < energy <= 1):
                raise RankError(f"{self.name}: energy must be in (0, 1], got {energy!r}")
            resolved = self.rank_from_energy(layer, energy)
        elif rank is None:
            resolved = full
        elif is_fraction(rank):
            if not 0.0 < rank <= 1.0:
                raise RankError(f"{self.name}: a fractional rank must be in (0, 1], got {rank}")
            resolved = tuple(fraction_to_rank(rank, f) for f in fulls)
        elif isinstance(rank, (list, tuple)):
            if len(rank) != len(fulls):
                raise RankError(
                    f"{self.name}: rank needs {len(fulls)} value(s) ({', '.join(names)}), got {list(rank)}"
                )
            resolved = tuple(check_rank(r, f, n, self.name) for r, n, f in zip(rank, names, fulls))
        else:
            resolved = tuple(check_rank(self.broadcast_int_rank(layer, rank, i), f, n, self.name)
                             for i, (n, f) in enumerate(zip(names, fulls)))
        resolved = resolved if isinstance(resolved, tuple) else (resolved,)
        resolved = tuple(align_rank(r, align, f) for r, f in zip(resolved, fulls))
        resolved = self.validate_rank(layer, resolved)
        return resolved[0] if len(resolved) == 1 else resolved

    def rank_component_names(self) -> tuple[str, ...]:
        """Names of the rank components, for messages (``('r',)``, ``('r_in', 'r_out')``)."""
        return self.rank_components

    def broadcast_int_rank(self, layer: nn.Module, value: int, component: int) -> int:
        """How a single int applies to component ``component`` (default: the same value for each)."""
        return value

    def validate_rank(self, layer: nn.Module, rank: tuple[int, ...]) -> tuple[int, ...]:
        """Method-specific checks after resolution (e.g. divisibility); may adjust or raise RankError."""
        return rank

    # -- weights ------------------------------------------------------------------------------
    @abc.abstractmethod
    def decompose(self, layer: nn.Module, rank: Rank) -> FactorizedLayer:
        """Build the factorized module for ``layer`` at ``rank`` with weights computed from the layer.

        Computes in float64 and casts back to the layer's dtype and device.
        """

    def build(self, layer: nn.Module, rank: Rank) -> FactorizedLayer:
        """Build the factorized module's structure only (weights uninitialized), for reloading."""
        return self.module_cls.empty(layer, tuple(rank) if isinstance(rank, list) else rank)

    def __repr__(self) -> str:
        return f"<method {self.name}>"


_REGISTRY: dict[str, FactorizationMethod] = {}


def register(method: FactorizationMethod) -> FactorizationMethod:
    """Add a method instance to the registry under ``method.name``."""
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> FactorizationMethod:
    """The registered method called ``name``; the error lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownMethodError(f"unknown method {name!r}; known methods: {known}") from None


def available_methods() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_REGISTRY)
