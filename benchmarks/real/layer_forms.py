"""Per-layer forms of factorized models and the latency model's times of them, in float and in int8.

Why one allocation's int8 model runs slower than another's at the same MACs is a question about layers:
which form (method, rank) each conv got, and what that form costs in the float kernels and in the int8
ones. This reads the forms from each model's report and times them with ``convfactor``'s own latency model
(``LatencyModel.layer_times``: one-layer ONNX graphs on the layer's real input shape, interleaved with the
original layer, between channel-blocked neighbours), once with ``LatencyOptions(int8=False)`` and once with
``int8=True``: the numbers the automatic policy itself decides with.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

import convfactor
from convfactor.auto.latency.model import LatencyModel
from convfactor.costs import layer_macs, meta_twin, module_macs
from convfactor.methods import get_method

__all__ = ["layer_inputs", "forms", "form_times"]


def layer_inputs(model: nn.Module, example: Sequence[torch.Tensor], **kwargs) -> dict[str, tuple]:
    """{name: (input shape, MACs)} of every Conv/Linear layer of ``model`` run on ``example`` (its batch)."""
    found: dict[str, tuple] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            found.setdefault(name, (tuple(args[0].shape), layer_macs(module, out.shape)))
        return hook

    handles = [sub.register_forward_hook(record(name)) for name, sub in model.named_modules()
               if isinstance(sub, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(*example, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return found


def forms(factorized: nn.Module) -> dict[str, tuple[str, object]]:
    """{layer name: (method, rank)} of every replaced layer, from the model's ``FactorizeReport``."""
    return {d.name: (d.method, d.rank) for d in convfactor.get_report(factorized).layers if d.status == "replaced"}


def _rank(rank: object) -> object:
    return tuple(rank) if isinstance(rank, list) else rank


def form_times(original: nn.Module, shapes: Mapping[str, tuple], variants: Mapping[str, Mapping[str, tuple]],
               threads: int = 1) -> dict[str, dict]:
    """Per layer: the original's and each variant's form, MACs ratio and latency-model time, float and int8.

    Args:
        original: the float network (its layers are the templates).
        shapes: ``layer_inputs`` of it at the deployed batch.
        variants: {variant name: ``forms`` of it}.
        threads: onnxruntime intra-op threads.
    Returns:
        {layer: {"input": shape, "macs": original MACs, "float_ms": ..., "int8_ms": ...,
        "variants": {name: {"method", "rank", "macs_ratio", "float_ms", "int8_ms"}}}}; a layer a variant left as is
        has no entry there.
    """
    layers = dict(original.named_modules())
    models = {kind: LatencyModel({"threads": threads, "int8": kind == "int8_ms", "cache": False})
              for kind in ("float_ms", "int8_ms")}
    out: dict[str, dict] = {}
    for name, (shape, macs) in shapes.items():
        layer = layers[name]
        wanted = sorted({(m, _rank(r)) for chosen in variants.values() for n, (m, r) in chosen.items() if n == name},
                        key=repr)
        row: dict = {"input": list(shape), "macs": macs, "variants": {}}
        times = {}
        for kind, model in models.items():
            row[kind], times[kind] = model.layer_times(layer, shape, wanted)
        for variant, chosen in variants.items():
            if name in chosen:
                method, rank = chosen[name][0], _rank(chosen[name][1])
                built = get_method(method).build(meta_twin(layer).to_empty(device="cpu"), rank)  # structure only
                row["variants"][variant] = {"method": method, "rank": rank,
                                            "macs_ratio": module_macs(built, shape) / macs,
                                            **{kind: times[kind][(method, rank)] for kind in models}}
        out[name] = row
    return out
