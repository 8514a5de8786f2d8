"""Per-layer input statistics and layer sensitivities on calibration data (batched by ``convfactor.batches``).

Statistics: for each layer, Sigma = E[p p^T] over the input patches p of its output positions (the
C_in/g * k_h * k_w values one output pixel reads, per group; for a Linear, its input vector), collected
with forward pre-hooks while the (BatchNorm-folded) network runs on the calibration batches. Patches
(``convfactor.auto.statistics.patches``) are read after the layer's own padding (``padding_mode`` and 'same'
included), with its stride and dilation, so every geometry is handled the way the layer sees it. At
most ``max_rows`` positions per layer are used (a seeded random subset, gathered without unfolding the
other positions), which bounds the cost for high-resolution layers and large kernels.
A full D x D covariance is kept only where it fits ``memory_budget``; other layers get a
Kronecker-factored (channels x kernel taps) or diagonal statistic (``convfactor.auto.statistics.covariance``),
and the report says which.

Sensitivities (how much of a layer's output error reaches the network output) are measured by
``convfactor.auto.statistics.sensitivity``; ``layer_sensitivities`` is exported here too, beside the
statistics it is computed with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import ConvfactorError
from ...geometry import LayerGeometry
from ...progress import track
from .covariance import (
    WORKING_COPIES,
    Covariance,
    choose_form,
)
from .patches import Moments, chunks, patch_extractor, positions, sampled, sampled_rows
from .sensitivity import layer_sensitivities

__all__ = [
    "LayerStatistics",
    "patch_extractor",
    "layer_statistics",
    "layer_sensitivities",
    "execution_order",
    "DEFAULT_MAX_ROWS",
    "DEFAULT_MEMORY_BUDGET",
    "KRONECKER_ROWS",
    "statistic_forms",
]

DEFAULT_MAX_ROWS = 16384
# Patches per layer for a Kronecker-factored statistic: its channel factor costs rows * C^2 * K.
KRONECKER_ROWS = 4096
# Working memory of the statistics and of one layer's fit (bytes); see ``statistic_forms``.
DEFAULT_MEMORY_BUDGET = 1 << 30


@dataclass
class LayerStatistics:
    """Second moments of one layer's input patches.

    Attributes:
        covariance: E[p p^T] per group (D = C_in/g * kernel volume) as a ``Covariance``: full (g, D, D)
            when it fits the memory budget, else Kronecker-factored or diagonal (``describe()`` says).
        rows: patches (positions) averaged.
    """

    covariance: Covariance
    rows: int


def statistic_forms(layers: Mapping[str, nn.Module], memory_budget: float) -> dict[str, tuple[str, str]]:
    """{name: (form, why)}: full covariances, smallest first, while they fit half the budget together
    (and WORKING_COPIES of each fit the other half); the rest as ``choose_form`` says."""
    forms: dict[str, tuple[str, str]] = {}
    held = 0.0
    shapes = {}
    for name, layer in layers.items():
        geo = LayerGeometry.of(layer)
        kernel = 1 if geo.kind == "Linear" else geo.kernel_volume
        shapes[name] = (geo.groups, geo.in_channels // geo.groups, kernel)
    for name in sorted(layers, key=lambda n: shapes[n][0] * (shapes[n][1] * shapes[n][2]) ** 2):
        g, c, k = shapes[name]
        form, why = choose_form(g, c, k, memory_budget / 2)
        if form == "full" and held + 8 * g * (c * k) ** 2 > memory_budget / 2:
            form, why = choose_form(g, c, k, 0.0)
            why = "the full covariances of smaller layers already use the memory budget"
            if k > 1 and WORKING_COPIES * 8 * g * (c * c + k * k) <= memory_budget / 2:
                form = "kronecker"
        if form == "full":
            held += 8 * g * (c * k) ** 2
        forms[name] = (form, why)
    return forms


@torch.no_grad()
def layer_statistics(
    root: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Sequence[tuple[torch.Tensor, ...]],
    max_rows: int = DEFAULT_MAX_ROWS,
    seed: int = 0,
    memory_budget: float = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
    on_output: Callable[[int, Any], None] | None = None,
) -> dict[str, LayerStatistics]:
    """Patch covariances of the named layers while ``root`` runs on ``batches``.

    Args:
        root: the network (BatchNorm already folded, as it will be factorized).
        layers: {qualified name: layer} to collect for (each a submodule of ``root``).
        batches: input tuples, as from ``calibration_batches``.
        max_rows: patches per layer at most, a seeded random subset spread over the batches
            (KRONECKER_ROWS for a Kronecker-factored statistic).
        memory_budget: bytes the statistics and one layer's fit may use (see ``statistic_forms``).
        progress: show a progress bar over the batches.
        on_output: called with (batch index, the network's output) after each batch, so that a caller
            needing the original's outputs on these batches (the fidelity checks) need not run it again.
    Returns:
        {name: LayerStatistics}.
    """
    generator = torch.Generator().manual_seed(seed)
    forms = statistic_forms(layers, memory_budget)
    moments: dict[str, Moments] = {}
    handles = []
    for name, layer in layers.items():
        extract = patch_extractor(layer)
        geo = LayerGeometry.of(layer)
        form, why = forms[name]
        kernel = 1 if geo.kind == "Linear" else geo.kernel_volume
        acc = moments[name] = Moments(form, geo.groups, geo.in_channels // geo.groups, kernel, why)
        limit = min(max_rows, KRONECKER_ROWS) if form == "kronecker" else max_rows
        per_batch = max(1, math.ceil(limit / len(batches)))

        def hook(module, args, extract=extract, acc=acc, per_batch=per_batch, layer=layer):
            x = args[0]
            if acc.form == "kronecker":
                v = positions(x.to(layer.weight.dtype), acc.groups)
                keep = sampled(v[0], max_rows // len(batches) + 1, generator)
                v = v if keep is None else v[:, keep]
                acc.add_channels(v, v)
            for chunk in chunks(x, layer):
                keep = sampled_rows(extract.positions(chunk), max(1, math.ceil(per_batch * len(chunk) / len(x))),
                                     generator, chunk.device)
                p = extract(chunk, keep)
                p = p.reshape(p.shape[0], acc.groups, -1).transpose(0, 1)  # (g, rows, D)
                acc.add(p, p)

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        for index, batch in enumerate(track(batches, progress, "statistics", unit="batch")):
            output = root(*batch)
            if on_output is not None:
                on_output(index, output)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in layers if moments[name].sums is None]
    if missing:
        raise ConvfactorError(f"calibration never reached layer {missing[0]!r} (is it used in forward?)")
    return {name: LayerStatistics(moments[name].result(), moments[name].rows) for name in layers}


@torch.no_grad()
def execution_order(root: nn.Module, names: Sequence[str], example_inputs: Sequence[torch.Tensor]) -> list[str]:
    """``names`` in the order their layers first run in a forward pass (layers never run come last)."""
    order: list[str] = []
    handles = []
    for name in names:
        def hook(module, args, name=name):
            if name not in order:
                order.append(name)
        handles.append(root.get_submodule(name).register_forward_pre_hook(hook))
    try:
        root(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return order + [n for n in names if n not in order]
