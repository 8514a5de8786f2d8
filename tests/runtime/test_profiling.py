"""profile_layers: onnxruntime node times land on the PyTorch layer names, replaced layers included."""

from __future__ import annotations

import copy
import json

import onnx
import pytest
import torch
from torch import nn

from convfactor.errors import ConvfactorError
from convfactor.methods import get_method
from convfactor.runtime.export import export_onnx
from convfactor.runtime.node_scopes import source_scopes
from convfactor.runtime.profiling import OUTSIDE_LAYERS, profile_layers, profile_model


class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.bn(self.conv1(x)))) + x)


class Net(nn.Module):
    """16 channels so that onnxruntime's NCHWc path (with its renamed, fused nodes) is taken."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.layer1 = nn.Sequential(Block(16), Block(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layer1(torch.relu(self.stem(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


CONVS = {"stem", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"}
REPLACED = {"layer1.0.conv1", "layer1.1.conv2"}


def _models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    original = Net().eval()
    factorized = copy.deepcopy(original)
    method = get_method("spatial_svd")
    for name in REPLACED:
        block_name, conv_name = name.rsplit(".", 1)
        block = factorized.get_submodule(block_name)
        conv = getattr(block, conv_name)
        setattr(block, conv_name, method.decompose(conv, method.resolve_rank(conv, 0.5)))
    return original, factorized


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_time_is_attributed_to_original_layer_names(exporter):
    original, factorized = _models()
    report = profile_layers(original, factorized, input_shape=(1, 3, 16, 16), warmup=1, iterations=3,
                            exporter=exporter)
    rows = {row.layer: row for row in report.layers}
    # Every conv and the classifier has time in both models, under its own name.
    assert CONVS | {"fc"} <= set(rows)
    for name in CONVS | {"fc"}:
        assert rows[name].original_ms > 0 and rows[name].factorized_ms > 0, name
    # Replaced layers are found from the factorized model's submodules, and only they.
    assert {row.layer for row in report.replaced_layers()} == REPLACED
    for name in REPLACED:
        stages = " ".join(rows[name].factorized_nodes)
        assert len(rows[name].factorized_nodes) >= 2, stages
    # No compute node is left without a layer, and fused activations are not mistaken for layers.
    for profile in (report.original, report.factorized):
        for node in profile.nodes:
            if node.op_type.split("::")[-1] in ("Conv", "FusedConv", "Gemm"):
                assert node.layer != OUTSIDE_LAYERS, node
                assert not node.layer.endswith((".relu", ".bn")), node
        assert profile.runs == 3 and profile.run_ms > 0
    # Slower replacements are what the rows say they are, and the table marks them.
    slower = {row.layer for row in report.slower_replacements()}
    assert slower == {n for n in REPLACED if rows[n].factorized_ms >= rows[n].original_ms}
    assert ("SLOWER" in report.render()) == bool(slower)
    json.dumps(report.to_dict(), allow_nan=False)


def test_explicit_replaced_list_and_onnx_path(tmp_path):
    original, factorized = _models()
    x = torch.randn(1, 3, 16, 16)
    path = export_onnx(original, x, tmp_path / "original.onnx", exporter="torchscript").path
    report = profile_layers(path, factorized, x, warmup=0, iterations=2, exporter="torchscript",
                            replaced=["layer1.0.conv1"])
    assert [row.layer for row in report.replaced_layers()] == ["layer1.0.conv1"]
    assert report.original.path == str(path) and report.factorized.path is None


def test_profile_model_and_layer_times():
    original, _ = _models()
    profile = profile_model(original, torch.randn(1, 3, 16, 16), warmup=1, iterations=2, exporter="torchscript")
    times = profile.layer_times()
    assert CONVS <= set(times)
    assert sum(times.values()) == pytest.approx(profile.node_total_ms, rel=1e-9)
    assert all(n.median_us >= 0 and n.mean_us >= 0 for n in profile.nodes)


def _node(name: str, op_type: str = "Conv", inputs=("x", "w"), scopes: str | None = None) -> onnx.NodeProto:
    node = onnx.helper.make_node(op_type, list(inputs), ["y"], name=name)
    if scopes is not None:
        entry = node.metadata_props.add()
        entry.key, entry.value = "pkg.torch.onnx.name_scopes", scopes
    return node


def test_source_scopes_from_each_exporter():
    # TorchScript: container children are written "<container>.<index>", others by attribute name.
    assert source_scopes(_node("/layer1/layer1.0/conv1/Conv")) == ("layer1", "layer1.0", "layer1.0.conv1")
    assert source_scopes(_node("/1/1.0/seq/seq.1/seq.1.0/Conv")) == (
        "1", "1.0", "1.0.seq", "1.0.seq.1", "1.0.seq.1.0")
    assert source_scopes(_node("/Flatten", "Flatten", ["x"])) == ()
    # dynamo: metadata; the last entry is the op, not a module.
    dynamo = _node("node_conv2d", scopes="['', 'layer1', 'layer1.0', 'conv2d']")
    assert source_scopes(dynamo) == ("layer1", "layer1.0")
    # A parameter-named weight wins over metadata (exporter fusions relabel Conv+BN as the BN).
    fused = _node("node_Conv_40", inputs=("x", "layer1.0.conv1.weight"),
                  scopes="['', 'layer1', 'layer1.0', 'layer1.0.bn', 'batch_norm']")
    assert source_scopes(fused, initializer_names={"layer1.0.conv1.weight"}) == (
        "layer1", "layer1.0", "layer1.0.conv1")
    assert source_scopes(fused, module_names={"layer1", "layer1.0"},
                         initializer_names={"layer1.0.conv1.weight"}) == ("layer1", "layer1.0")


def test_bad_arguments_are_user_errors():
    original, factorized = _models()
    with pytest.raises(ConvfactorError, match="input_shape"):
        profile_layers(original, factorized)
    with pytest.raises(ConvfactorError, match="iterations"):
        profile_layers(original, factorized, input_shape=(1, 3, 16, 16), iterations=0)
