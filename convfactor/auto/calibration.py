"""Calibration data: batches from what the user passes, per-layer input statistics, layer sensitivities.

Statistics: for each layer, Sigma = E[p p^T] over the input patches p of its output positions (the
C_in/g * k_h * k_w values one output pixel reads, per group; for a Linear, its input vector), collected
with forward pre-hooks while the (BatchNorm-folded) network runs on the calibration batches. Patches are
extracted by a one-hot depthwise conv with the layer's own stride, padding, dilation and padding mode, so
every geometry is handled the way the layer sees it. At most ``max_rows`` positions per layer are used
(a seeded random subset), which bounds the cost for high-resolution layers.

Sensitivity: how much of a layer's output error reaches the network output. A probe replacement is
swapped in for one layer at a time (a forward hook), and the network output's relative squared error is
divided by the layer output's: errors then add up, to first order, as sum_l sensitivity_l * error2_l.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConvfactorError
from ..geometry import LayerGeometry

__all__ = [
    "LayerStatistics",
    "calibration_batches",
    "patch_extractor",
    "layer_statistics",
    "layer_sensitivities",
    "paired_statistics",
    "execution_order",
    "flat_outputs",
    "DEFAULT_MAX_SAMPLES",
    "DEFAULT_MAX_ROWS",
]

DEFAULT_MAX_SAMPLES = 512
DEFAULT_MAX_ROWS = 16384
_SPLIT_BATCH = 64


@dataclass
class LayerStatistics:
    """Second moments of one layer's input patches.

    Attributes:
        covariance: (g, D, D) float64, E[p p^T] per group, D = C_in/g * kernel volume.
        rows: patches (positions) averaged.
    """

    covariance: torch.Tensor
    rows: int


def calibration_batches(
    calibration: Any,
    n_inputs: int = 1,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    like: Sequence[torch.Tensor] | None = None,
) -> list[tuple[torch.Tensor, ...]]:
    """The calibration data as a list of input tuples, at most ``max_samples`` samples in all.

    Args:
        calibration: a tensor (split into batches of 64), a tuple of tensors (one batch of a
            multi-input model), or an iterable of batches (a list, a DataLoader); a batch that is a
            list/tuple holding more than the model's inputs (``(x, y)``) keeps its first ``n_inputs``.
        n_inputs: how many tensors the model takes.
        max_samples: stop after this many samples (the last batch is cut).
        like: example inputs whose dtype and device floating-point batches are cast to.
    Raises:
        ConvfactorError: nothing usable was given.
    """
    if isinstance(calibration, torch.Tensor):
        source: Iterable[Any] = calibration[:max_samples].split(_SPLIT_BATCH)
    elif isinstance(calibration, tuple) and all(isinstance(t, torch.Tensor) for t in calibration) \
            and len(calibration) == n_inputs:
        source = [calibration]
    elif isinstance(calibration, (str, bytes, Mapping)) or not isinstance(calibration, Iterable):
        raise ConvfactorError(f"calibration must be a tensor, a list of batches or a DataLoader, "
                              f"not {type(calibration).__name__}")
    else:
        source = calibration
    batches: list[tuple[torch.Tensor, ...]] = []
    count = 0
    for batch in source:
        tensors = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)[:n_inputs]
        if len(tensors) != n_inputs or not all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in tensors):
            raise ConvfactorError(f"each calibration batch must hold the model's {n_inputs} input tensor(s) "
                                  f"with a batch axis")
        take = min(len(tensors[0]), max_samples - count)
        tensors = tuple(t[:take] for t in tensors)
        if like is not None:
            tensors = tuple(t.to(device=e.device, dtype=e.dtype) if t.is_floating_point() else t.to(e.device)
                            for t, e in zip(tensors, like))
        batches.append(tensors)
        count += take
        if count >= max_samples:
            break
    if not batches or count == 0:
        raise ConvfactorError("calibration data is empty")
    return batches


def patch_extractor(layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function mapping the layer's input to its patches, (rows, C_in * K), channels-major per row.

    Column c*K + k holds input channel c at kernel offset k (row-major over the kernel), the order of
    ``layer.weight[o].flatten()`` when groups == 1; group q's patch is the q-th block of C_in/g * K
    columns. A Linear's "patch" is its input vector.
    """
    geo = LayerGeometry.of(layer)
    if geo.kind == "Linear":
        return lambda x: x.reshape(-1, x.shape[-1])
    volume = geo.kernel_volume
    extractor = type(layer)(geo.in_channels, geo.in_channels * volume, layer.kernel_size, stride=layer.stride,
                            padding=layer.padding, dilation=layer.dilation, groups=geo.in_channels, bias=False,
                            padding_mode=layer.padding_mode, device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        one_hot = torch.eye(volume, dtype=layer.weight.dtype, device=layer.weight.device)
        extractor.weight.copy_(one_hot.repeat(geo.in_channels, 1).reshape(extractor.weight.shape))
    extractor.requires_grad_(False)

    def patches(x: torch.Tensor) -> torch.Tensor:
        out = extractor(x.to(layer.weight.dtype))  # (N, C_in*K, *spatial)
        return out.flatten(2).transpose(1, 2).reshape(-1, out.shape[1])

    return patches


@torch.no_grad()
def layer_statistics(
    root: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Sequence[tuple[torch.Tensor, ...]],
    max_rows: int = DEFAULT_MAX_ROWS,
    seed: int = 0,
) -> dict[str, LayerStatistics]:
    """Patch covariances of the named layers while ``root`` runs on ``batches``.

    Args:
        root: the network (BatchNorm already folded, as it will be factorized).
        layers: {qualified name: layer} to collect for (each a submodule of ``root``).
        batches: input tuples, as from ``calibration_batches``.
        max_rows: patches per layer at most, a seeded random subset spread over the batches.
    Returns:
        {name: LayerStatistics}.
    """
    generator = torch.Generator().manual_seed(seed)
    per_batch = max(1, math.ceil(max_rows / len(batches)))
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    handles = []
    for name, layer in layers.items():
        extract = patch_extractor(layer)
        groups = LayerGeometry.of(layer).groups

        def hook(module, args, name=name, extract=extract, groups=groups):
            p = extract(args[0])
            if p.shape[0] > per_batch:
                p = p[torch.randperm(p.shape[0], generator=generator)[:per_batch].to(p.device)]
            p = p.reshape(p.shape[0], groups, -1).transpose(0, 1)  # (g, rows, D)
            moment = (p.transpose(1, 2) @ p).to(torch.float64).cpu()
            sums[name] = sums[name] + moment if name in sums else moment
            rows[name] = rows.get(name, 0) + p.shape[1]

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        for batch in batches:
            root(*batch)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in layers if name not in sums]
    if missing:
        raise ConvfactorError(f"calibration never reached layer {missing[0]!r} (is it used in forward?)")
    return {name: LayerStatistics(sums[name] / rows[name], rows[name]) for name in layers}


@torch.no_grad()
def paired_statistics(
    reference: nn.Module,
    work: nn.Module,
    name: str,
    batches: Sequence[tuple[torch.Tensor, ...]],
    max_rows: int = DEFAULT_MAX_ROWS,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments of one layer's input patches in two networks run on the same batches.

    ``reference`` is the original network, ``work`` the partially factorized one (its layer ``name`` not
    yet replaced). The same positions are sampled in both.

    Returns:
        sigma: (g, D, D) E[p_w p_w^T] of the patches ``work`` feeds the layer;
        cross: (g, D, D) E[p_w p_r^T] between them and the reference network's patches.
    """
    layer = reference.get_submodule(name)
    extract = patch_extractor(layer)
    groups = LayerGeometry.of(layer).groups
    generator = torch.Generator().manual_seed(seed)
    per_batch = max(1, math.ceil(max_rows / len(batches)))
    captured: dict[str, torch.Tensor] = {}

    def hook_for(role: str):
        def hook(module, args):
            captured[role] = extract(args[0])
        return hook

    handles = [reference.get_submodule(name).register_forward_pre_hook(hook_for("reference")),
               work.get_submodule(name).register_forward_pre_hook(hook_for("work"))]
    sigma = cross = None
    rows = 0
    try:
        for batch in batches:
            reference(*batch)
            work(*batch)
            p_ref, p_work = captured.pop("reference"), captured.pop("work")
            if p_ref.shape[0] > per_batch:
                keep = torch.randperm(p_ref.shape[0], generator=generator)[:per_batch].to(p_ref.device)
                p_ref, p_work = p_ref[keep], p_work[keep]
            p_ref = p_ref.reshape(p_ref.shape[0], groups, -1).transpose(0, 1).to(torch.float64)
            p_work = p_work.reshape(p_work.shape[0], groups, -1).transpose(0, 1).to(torch.float64)
            s = (p_work.transpose(1, 2) @ p_work).cpu()
            c = (p_work.transpose(1, 2) @ p_ref).cpu()
            sigma, cross = (s, c) if sigma is None else (sigma + s, cross + c)
            rows += p_ref.shape[1]
    finally:
        for handle in handles:
            handle.remove()
    return sigma / rows, cross / rows


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


def flat_outputs(output: Any) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, or nested tuples/lists/dicts of tensors)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in flat_outputs(item)]
    return []


def _without_bias(layer: nn.Module, out: torch.Tensor) -> torch.Tensor:
    if layer.bias is None:
        return out
    if isinstance(layer, nn.Linear):
        return out - layer.bias
    return out - layer.bias.reshape(1, -1, *([1] * (out.dim() - 2)))


@torch.no_grad()
def layer_sensitivities(
    root: nn.Module,
    layers: Mapping[str, nn.Module],
    probes: Mapping[str, nn.Module],
    batches: Sequence[tuple[torch.Tensor, ...]],
) -> dict[str, dict[str, float]]:
    """Network-output error caused by each probe replacement alone, relative to the layer's own error.

    Args:
        root: the network.
        layers: {name: layer in root}.
        probes: {name: module to run instead of that layer} (same input and output shapes).
        batches: input tuples.
    Returns:
        {name: {"layer_error2": E||y' - y||^2 / E||y - b||^2, "output_error2": the same for the
        network's outputs, "sensitivity": their ratio}} (sensitivity 0 when the probe is exact).
    """
    reference = [[t.detach() for t in flat_outputs(root(*batch))] for batch in batches]
    signal = sum(float((t.double() ** 2).sum()) for outs in reference for t in outs)
    result: dict[str, dict[str, float]] = {}
    for name, probe in probes.items():
        layer = layers[name]
        totals = {"error": 0.0, "signal": 0.0}

        def hook(module, args, out, probe=probe, layer=layer, totals=totals):
            new = probe(args[0])
            totals["error"] += float(((new - out).double() ** 2).sum())
            totals["signal"] += float((_without_bias(layer, out).double() ** 2).sum())
            return new

        handle = layer.register_forward_hook(hook)
        try:
            output_error = 0.0
            for batch, outs in zip(batches, reference):
                new_outs = flat_outputs(root(*batch))
                output_error += sum(float(((a - b).double() ** 2).sum()) for a, b in zip(new_outs, outs))
        finally:
            handle.remove()
        layer_error2 = totals["error"] / totals["signal"] if totals["signal"] > 0 else 0.0
        output_error2 = output_error / signal if signal > 0 else 0.0
        result[name] = {
            "layer_error2": layer_error2,
            "output_error2": output_error2,
            "sensitivity": output_error2 / layer_error2 if layer_error2 > 0 else 0.0,
        }
    return result
