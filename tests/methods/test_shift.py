"""Shift + pointwise specifics: tap choice, error, energy ranks, rejections, reload, ONNX as data movement."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from convfactor.errors import RankError
from convfactor.methods import get_method
from convfactor.methods.shift import ShiftConv, tap_energy
from convfactor.runtime.export import export_onnx
from convfactor.runtime.onnx_graph import conv_nodes, onnx_node_counts

from .conftest import LayerCase, factorize, relative_error

SHIFT = get_method("shift")


def test_keeps_each_channels_strongest_taps() -> None:
    layer = LayerCase("Conv2d", 3, 4, (3, 3)).build()
    with torch.no_grad():
        layer.weight.mul_(0.01)
        layer.weight[:, 0, 0, 2] = 5.0  # channel 0: tap 2 (row 0, col 2)
        layer.weight[:, 1, 2, 1] = 5.0  # channel 1: tap 7
        layer.weight[:, 2, 1, 1] = 5.0  # channel 2: the centre, tap 4
        layer.weight[:, 2, 0, 0] = 4.0  # ... then tap 0
    assert factorize(SHIFT, layer, rank=1).shift.taps.tolist() == [[2], [7], [4]]
    assert factorize(SHIFT, layer, rank=2).shift.taps[2].tolist() == [0, 4]


def test_error_is_the_dropped_tap_energy() -> None:
    layer = LayerCase("Conv2d", 4, 5, (3, 3)).build()
    energy = tap_energy(layer.weight).numpy()
    kept = np.sort(energy, axis=1)[:, ::-1].cumsum(axis=1).sum(axis=0)
    for m in range(1, 10):
        expected = np.sqrt(1 - kept[m - 1] / energy.sum())
        actual = relative_error(factorize(SHIFT, layer, rank=m).dense_weight(), layer.weight)
        assert abs(actual - expected) <= 1e-12
    assert SHIFT.resolve_rank(layer, energy=float(kept[2] / energy.sum())) == 3


@pytest.mark.parametrize(("layer", "reason"), [
    (nn.Conv2d(4, 8, 1), "nothing to shift"),
    (nn.Conv2d(4, 8, 3, groups=2), "groups=2"),
    (nn.Conv2d(4, 8, 3, groups=4), "already depthwise"),
    (nn.Linear(4, 8), "not Linear"),
])
def test_rejects_with_a_reason(layer: nn.Module, reason: str) -> None:
    assert reason in SHIFT.unsupported_reason(layer)
    with pytest.raises(RankError, match="^shift cannot represent this layer"):
        ShiftConv.from_conv(layer)


def test_reload_restores_the_taps_and_their_gathers() -> None:
    case = LayerCase("Conv2d", 5, 6, (3, 3), stride=(2, 1), padding=(1, 1), dilation=(1, 2))
    layer = case.build(torch.float32)
    module = factorize(SHIFT, layer, rank=2)
    reloaded = SHIFT.build(layer, 2)
    assert reloaded.shift.taps.tolist() != module.shift.taps.tolist()  # the built default differs
    reloaded.load_state_dict(module.state_dict())
    assert reloaded.shift.pairs == module.shift.pairs
    x = case.input(torch.float32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), module(x))


@pytest.mark.parametrize("m", [1, 9])
def test_exports_as_data_movement_not_as_a_conv(tmp_path, m: int) -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    model = nn.Sequential(factorize(SHIFT, layer, rank=m), nn.ReLU()).eval()
    x = torch.randn(2, 8, 9, 9)
    result = export_onnx(model, x, tmp_path / "shift.onnx", exporter="torchscript")
    counts = onnx_node_counts(result.path)
    # The only Conv is the 1x1; the shift is Pad + Slice (+ Gather) + Concat.
    assert [(c.kernel_shape, c.group) for c in conv_nodes(result.path)] == [((1, 1), 1)]
    assert counts.get("Slice", 0) >= 1 and counts.get("Pad", 0) == 1 and counts.get("Concat", 0) >= 1
    # (TorchScript spells F.pad's pads with a few shape ops that onnxruntime folds at load time.)
    assert set(counts) <= {"Pad", "Slice", "Gather", "Concat", "Conv", "Relu", "Constant", "ConstantOfShape",
                           "Reshape", "Transpose", "Cast"}
    onnx.checker.check_model(str(result.path), full_check=True)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
