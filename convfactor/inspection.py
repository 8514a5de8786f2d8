"""What a network holds before it is factorized: per-layer geometry, params, MACs and spectra.

``inspect_model`` is the analysis behind ``convfactor inspect``, as plain data (dicts, lists, numbers)
for scripts and notebooks: every Conv/Linear layer with its shape, parameter and MAC counts, and the
energy (share of squared singular values) each method keeps at a few fractions of its full rank, which
is what a policy's ranks trade against.

    table = convfactor.inspect_model(model, torch.randn(1, 3, 32, 32), methods=["spatial_svd", "tucker2"])
    heavy = max(table["layers"], key=lambda row: row["macs"])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .errors import ConvfactorError

__all__ = ["inspect_model", "ENERGY_FRACTIONS"]

ENERGY_FRACTIONS = (0.25, 0.5, 0.75)


def inspect_model(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor],
                  methods: Sequence[str] | None = None,
                  fractions: Sequence[float] = ENERGY_FRACTIONS) -> dict[str, Any]:
    """Per-layer facts of ``model`` as it is, and the energy each method keeps at a few ranks.

    The model runs once on ``example_inputs`` (in eval mode, without gradients) for the output shapes
    and MACs; its weights and train/eval flags are as they were afterwards.

    Args:
        model: the network (every Conv1d/Conv2d/Linear is listed, stages of factorized layers included).
        example_inputs: a tensor or a sequence of tensors (batch first), as ``forward`` takes them.
        methods: method names to compute energies for; None: every registered method.
        fractions: fractions of each method's full rank, each in (0, 1].
    Returns:
        ``{"input_shape", "input_shapes", "fractions", "methods", "layers": [...], "totals": {...}}``.
        Each layer: ``name, type, in, out, kernel, stride, groups, output_shape, params, macs,
        macs_share, energy``, where ``energy[method]`` is a list (one value per fraction), ``None`` for
        a method without a spectrum, or ``{"unsupported": reason}``. ``totals``: ``params`` (the whole
        model), ``layer_macs`` (Conv/Linear MACs per sample), ``layers``.
    Raises:
        ConvfactorError: no example inputs, an unknown method, or a fraction outside (0, 1].

    Example:
        >>> table = inspect_model(model, torch.randn(1, 3, 32, 32), methods=["spatial_svd"])
        >>> table["layers"][0]["energy"]["spatial_svd"]  # energy kept at 25/50/75% of the full rank
        [...three fractions in [0, 1]...]
    """
    from passes.annotate_shapes import layer_io_shapes

    from .costs import count_params, layer_macs
    from .errors import RankError
    from .geometry import LayerGeometry, layer_kind
    from .inputs import as_input_tuple
    from .methods import available_methods, get_method
    from .ranks import fraction_to_rank, kept_energy

    inputs = as_input_tuple(example_inputs, allow_none=True)
    if not inputs:
        raise ConvfactorError("inspect_model needs example_inputs: a tensor or a sequence of tensors")
    methods = list(available_methods() if methods is None else methods)
    registered = [get_method(name) for name in methods]  # an unknown name: one error listing the known ones
    if not all(0 < f <= 1 for f in fractions):
        raise ConvfactorError(f"fractions must be in (0, 1], got {list(fractions)}")
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()  # BatchNorm must not update its running statistics on the example
        shapes = layer_io_shapes(model, inputs)
    finally:
        for module, training in flags:
            module.training = training
    rows = []
    for name, layer in model.named_modules():
        kind = layer_kind(layer)
        if kind is None:
            continue
        geo = LayerGeometry.of(layer)
        energy: dict[str, Any] = {}
        for method_name, method in zip(methods, registered):
            reason = method.unsupported_reason(layer)
            if reason:
                energy[method_name] = {"unsupported": reason}
                continue
            try:
                spectra = method.spectra(layer)
            except (RankError, NotImplementedError):
                energy[method_name] = None
                continue
            full = method.full_rank(layer)
            fulls = full if isinstance(full, tuple) else (full,)
            energy[method_name] = [
                min(kept_energy(s, fraction_to_rank(f, r)) for s, r in zip(spectra, fulls)) for f in fractions
            ]
        rows.append({
            "name": name or "(model)",
            "type": kind,
            "in": geo.in_channels,
            "out": geo.out_channels,
            "kernel": list(geo.kernel) if kind != "Linear" else None,
            "stride": list(geo.stride) if kind != "Linear" else None,
            "groups": geo.groups,
            "output_shape": list(shapes[name][1]) if name in shapes else None,
            "params": count_params(layer),
            "macs": layer_macs(layer, shapes[name][1]) if name in shapes else None,
            "energy": energy,
        })
    total_macs = sum(r["macs"] or 0 for r in rows)
    for row in rows:
        row["macs_share"] = None if row["macs"] is None or not total_macs else row["macs"] / total_macs
    return {
        "input_shape": list(inputs[0].shape),
        "input_shapes": [list(t.shape) for t in inputs],
        "fractions": list(fractions),
        "methods": methods,
        "layers": rows,
        "totals": {"params": count_params(model), "layer_macs": total_macs, "layers": len(rows)},
    }
