"""The model zoo: architectures build and trace, the digits split is fixed, shipped checkpoints hold up."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.fx
from torch import nn

from convfactor.errors import CheckpointError, ConvfactorError
from convfactor.zoo import (
    MODELS,
    PRETRAINED,
    UnknownModelError,
    evaluate_accuracy,
    get_model,
    import_factory,
    load_pretrained,
    pretrained_dir,
)
from convfactor.zoo.digits import calibration_subset, load_digits_split, split_indices
from convfactor.zoo.mobilenet import mobilenet_cifar, scaled_channels
from convfactor.zoo.resnet import resnet20

REPO = Path(__file__).resolve().parents[2]
MAX_CHECKPOINT_BYTES = 2 * 1024 * 1024
ACCURACY_TARGET = 0.95
ACCURACY_TOLERANCE = 0.005
# scikit-learn is an optional extra: only the data, checkpoint and training tests need it.
needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="needs scikit-learn")


@pytest.fixture(scope="module")
def train_digits():
    """examples/train_digits.py imported as a module; its environment default is undone afterwards."""
    saved_policy = os.environ.get("OMP_WAIT_POLICY")
    spec = importlib.util.spec_from_file_location("_convfactor_example_train_digits", REPO / "examples" / "train_digits.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)
    if saved_policy is None:
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = saved_policy


def _conv_names(model: nn.Module, kernel: tuple[int, int]) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == kernel]


# ---------------------------------------------------------------- architectures


@pytest.mark.parametrize("name", list(MODELS))
def test_model_traces_and_matches_eager(name):
    spec = MODELS[name]
    torch.manual_seed(0)
    model = get_model(name, num_classes=7).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(spec.input_shape)
    with torch.no_grad():
        eager, graph = model(x), traced(x)
    assert eager.shape == (spec.input_shape[0], 7)
    # Same modules, same order: bit-for-bit equal.
    assert torch.equal(eager, graph)
    assert import_factory(spec.factory) is not None
    call_targets = {node.target for node in traced.graph.nodes if node.op == "call_module"}
    assert "fc" in call_targets


@pytest.mark.parametrize("factory", ["convfactor.zoo.resnet:resnet20", "convfactor.zoo.mobilenet:mobilenet_cifar"])
def test_single_channel_input(factory):
    model = import_factory(factory)(num_classes=10, in_channels=1).eval()
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def test_resnet20_structure():
    model = resnet20()
    assert sum(p.numel() for p in model.parameters()) == 272_474
    assert len(_conv_names(model, (3, 3))) == 19
    # Option-B projections where the shape changes: exactly two 1x1 convs, named like torchvision.
    assert _conv_names(model, (1, 1)) == ["layer2.0.downsample.0", "layer3.0.downsample.0"]
    names = dict(model.named_modules())
    for expected in ("conv1", "bn1", "layer1.0.conv1", "layer3.2.bn2", "fc"):
        assert expected in names


def test_resnet18_imagenet_shape():
    model = get_model("resnet18")
    assert sum(p.numel() for p in model.parameters()) == 11_689_512  # torchvision's count
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    assert model.fc.out_features == 1000


def test_mobilenet_has_depthwise_pointwise_and_regular_convs():
    model = mobilenet_cifar()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [c for c in convs if c.groups > 1]
    assert depthwise and all(c.groups == c.in_channels == c.out_channels for c in depthwise)
    assert len([c for c in convs if c.kernel_size == (1, 1)]) == 5
    regular_3x3 = [c for c in convs if c.groups == 1 and c.kernel_size == (3, 3)]
    assert len(regular_3x3) == 3  # the stem and two in the body


@pytest.mark.parametrize("width, expected", [(1.0, 256), (0.5, 128), (0.25, 64), (0.01, 8)])
def test_mobilenet_width(width, expected):
    assert mobilenet_cifar(width=width).fc.in_features == expected
    assert scaled_channels(256, width) == expected


def test_bad_model_arguments_raise_convfactor_errors():
    with pytest.raises(UnknownModelError, match="unknown model 'resnet21'"):
        get_model("resnet21")
    with pytest.raises(ConvfactorError, match="resnet20"):
        get_model("resnet20", width=2.0)
    with pytest.raises(ConvfactorError, match="width must be > 0"):
        mobilenet_cifar(width=0)
    with pytest.raises(ConvfactorError, match="package.module:function"):
        import_factory("convfactor.zoo.resnet.resnet20")
    with pytest.raises(ConvfactorError, match="no callable"):
        import_factory("convfactor.zoo.resnet:resnet21")


# ---------------------------------------------------------------- digits data


@needs_sklearn
def test_digits_split_is_disjoint_stratified_and_fixed():
    from sklearn.datasets import load_digits

    labels = load_digits().target
    first, second = split_indices(labels), split_indices(labels)
    assert np.array_equal(first["train"], second["train"]) and np.array_equal(first["test"], second["test"])
    train, test = first["train"], first["test"]
    assert len(train) == 1347 and len(test) == 450
    assert not set(train) & set(test)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    # Stratified: every class's test share within one sample of its exact proportion.
    class_counts = np.bincount(labels)
    assert np.all(np.abs(np.bincount(labels[test]) - class_counts * 450 / len(labels)) < 1)
    # Pinned: a change of the split would silently invalidate the shipped accuracies.
    assert test[:8].tolist() == [1, 5, 9, 12, 14, 15, 16, 17]
    assert int(test.sum()) == 404_394
    other = split_indices(labels, seed=1)["test"]
    assert not np.array_equal(other, test)


@needs_sklearn
def test_digits_tensors():
    x_train, y_train = load_digits_split("train")
    x_test, y_test = load_digits_split("test")
    assert x_train.shape == (1347, 3, 32, 32) and x_test.shape == (450, 3, 32, 32)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert torch.equal(x_train[:, 0], x_train[:, 2])  # channels replicate the grayscale image
    assert abs(float(x_train.mean())) < 1e-5 and abs(float(x_train.std()) - 1) < 1e-5
    assert set(y_test.tolist()) == set(range(10))
    x_train[0] = 0  # callers get their own copy
    assert not torch.equal(load_digits_split("train")[0][0], x_train[0])
    with pytest.raises(ConvfactorError, match="unknown digits split 'val'"):
        load_digits_split("val")


@needs_sklearn
def test_calibration_subset_is_balanced_and_deterministic():
    x, y = calibration_subset(25, seed=3)
    assert x.shape == (25, 3, 32, 32)
    assert np.bincount(y.numpy(), minlength=10).tolist() == [3] * 5 + [2] * 5
    assert torch.equal(x, calibration_subset(25, seed=3)[0])
    assert not torch.equal(x, calibration_subset(25, seed=4)[0])
    with pytest.raises(ConvfactorError, match="calibration count"):
        calibration_subset(0)


def test_missing_sklearn_is_a_clear_error(monkeypatch):
    import convfactor.zoo.digits as digits

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    digits._raw_digits.cache_clear()
    digits._normalized_splits.cache_clear()
    with pytest.raises(ConvfactorError, match=r"needs scikit-learn: pip install 'convfactor\[examples\]'"):
        load_digits_split("train")


# ---------------------------------------------------------------- shipped checkpoints


@needs_sklearn
@pytest.mark.parametrize("name", list(PRETRAINED))
def test_shipped_checkpoint_reaches_recorded_accuracy(name):
    weights = pretrained_dir() / f"{name}.pt"
    assert weights.stat().st_size < MAX_CHECKPOINT_BYTES
    state = torch.load(weights, weights_only=True)
    assert all(t.dtype in (torch.float32, torch.int64) for t in state.values())
    model, metadata = load_pretrained(name)
    assert not model.training
    assert metadata["factory"] == MODELS[PRETRAINED[name]].factory
    assert metadata["input_shape"] == list(MODELS[PRETRAINED[name]].input_shape)
    assert metadata["split"] == {"train_images": 1347, "heldout_images": 450, "split_seed": 0}
    x, y = load_digits_split("test")
    accuracy = evaluate_accuracy(model, x, y)
    assert abs(accuracy - metadata["heldout_accuracy"]) <= ACCURACY_TOLERANCE
    assert accuracy >= ACCURACY_TARGET


def test_evaluate_accuracy_counts_and_restores_mode():
    class Oracle(nn.Module):
        def forward(self, x):  # predicts class round(x[:, 0])
            return nn.functional.one_hot(x[:, 0].round().long(), 3).float()

    model = Oracle().train()
    x = torch.tensor([[0.0], [1.0], [2.0], [2.0]])
    assert evaluate_accuracy(model, x, torch.tensor([0, 1, 2, 1]), batch_size=3) == 0.75
    assert model.training
    with pytest.raises(ConvfactorError):
        evaluate_accuracy(model, x, torch.tensor([0]))


@needs_sklearn
def test_load_pretrained_rejects_bad_files(tmp_path):
    with pytest.raises(UnknownModelError, match="unknown pretrained model"):
        load_pretrained("resnet20_cifar10")
    with pytest.raises(CheckpointError, match="missing checkpoint file"):
        load_pretrained("resnet20_digits", directory=tmp_path)
    name = "resnet20_digits"
    metadata = json.loads((pretrained_dir() / f"{name}.json").read_text())
    (tmp_path / f"{name}.json").write_text(json.dumps(metadata))
    (tmp_path / f"{name}.pt").write_bytes((pretrained_dir() / f"{name}.pt").read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="sha256"):
        load_pretrained(name, directory=tmp_path)


# ---------------------------------------------------------------- the training script


@needs_sklearn
def test_train_script_end_to_end_is_deterministic(train_digits, tmp_path, capsys):
    threads = torch.get_num_threads()
    # One thread: a second OpenMP thread only adds spin-waiting at this size.
    argv = ["--epochs", "1", "--limit", "48", "--eval-limit", "40", "--threads", "1",
            "--models", "resnet20_digits,mobilenet_digits"]
    assert train_digits.main([*argv, "--out-dir", str(tmp_path / "a")]) == 0
    assert train_digits.main([*argv, "--out-dir", str(tmp_path / "b")]) == 0
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
    for name in PRETRAINED:
        model, metadata = load_pretrained(name, directory=tmp_path / "a")
        assert metadata["epochs"] == 1 and metadata["threads"] == 1
        assert metadata["split"]["train_images"] == 48 and metadata["split"]["heldout_images"] == 40
        assert 0 <= metadata["heldout_accuracy"] <= 1
        first = torch.load(tmp_path / "a" / f"{name}.pt", weights_only=True)
        second = torch.load(tmp_path / "b" / f"{name}.pt", weights_only=True)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[key], second[key]) for key in first)
        assert all(t.is_contiguous() for t in first.values())
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        f"{name}.{ext}" for name in PRETRAINED for ext in ("json", "pt")
    )
    assert "held-out accuracy" in capsys.readouterr().out


def test_train_script_rejects_unknown_model(train_digits, tmp_path, capsys):
    assert train_digits.main(["--models", "resnet21", "--out-dir", str(tmp_path)]) == 2
    assert "error: unknown model(s) resnet21" in capsys.readouterr().err
    assert train_digits.main(["--epochs", "0", "--out-dir", str(tmp_path)]) == 2
    assert "error: --epochs must be >= 1, got 0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_random_shift_moves_content_within_bounds(train_digits):
    x = torch.zeros(16, 1, 12, 12)
    x[:, :, 6, 6] = 1.0
    shifted = train_digits.random_shift(x, 2, torch.Generator().manual_seed(0))
    positions = [divmod(int(img.flatten().argmax()), 12) for img in shifted[:, 0]]
    assert all(4 <= r <= 8 and 4 <= c <= 8 for r, c in positions)
    assert len(set(positions)) > 1
    assert torch.equal(train_digits.random_shift(x, 0, torch.Generator()), x)
