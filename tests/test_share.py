"""k-means weight sharing: codebooks per layer, the elbow rule, the packed ONNX file and the score."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import convfactor
from convfactor.errors import ConvfactorError
from convfactor.share import elbow_clusters, kmeans_1d, share_weights, sharing_report
from convfactor.share_onnx import export_shared_onnx, pack_codebooks


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def test_each_layer_keeps_at_most_2_to_the_bits_values_and_the_original_is_untouched() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    errors = {}
    for bits in (2, 4, 8):
        shared = share_weights(model, bits=bits)
        report = sharing_report(shared)
        assert [layer.name for layer in report.layers] == ["0", "2", "6"]
        for layer in report.layers:
            weight = shared.get_submodule(layer.name).weight
            assert len(torch.unique(weight)) == layer.clusters <= 2**bits and layer.bits <= bits
        for name in ("0.bias", "2.bias", "6.bias"):  # biases are not shared
            assert torch.equal(shared.state_dict()[name], before[name])
        errors[bits] = max(layer.weight_error for layer in report.layers)
    assert errors[8] < errors[4] < errors[2] < 1
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_kmeans_finds_separated_clusters_and_is_exact_on_few_values() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([-1.0, -0.2, 0.3, 2.0])
    values = rng.choice(centres, 5000) + 0.001 * rng.standard_normal(5000)
    centroids, labels = kmeans_1d(values, 4)
    assert np.allclose(centroids, centres, atol=1e-3)
    assert np.abs(values - centroids[labels]).max() <= 0.01
    few = np.array([0.5, -1.0, 0.5, 3.0])
    centroids, labels = kmeans_1d(few, 16)
    assert np.array_equal(centroids[labels], few)


def test_elbow_picks_the_number_of_clusters_the_data_has() -> None:
    rng = np.random.default_rng(1)
    values = rng.choice(np.linspace(-1, 1, 8), 20000) + 1e-4 * rng.standard_normal(20000)
    assert elbow_clusters(values) == 8


@pytest.mark.parametrize("kwargs", [{}, {"bits": 4, "clusters": 16}, {"bits": 0}, {"bits": 9},
                                    {"clusters": 1}, {"clusters": 300}, {"bits": 2.5}])
def test_bad_arguments_are_one_line_errors(kwargs) -> None:
    with pytest.raises(ConvfactorError) as info:
        share_weights(_model(), **kwargs)
    assert "\n" not in str(info.value)


def test_packed_onnx_is_smaller_and_runs_the_same(tmp_path) -> None:
    shared = share_weights(_model(), bits=4)
    x = torch.randn(2, 3, 8, 8)
    result, packed = export_shared_onnx(shared, x, tmp_path / "shared.onnx", exporter="torchscript")
    assert len(packed.packed) == 3 and packed.size_after == result.path.stat().st_size
    # 16*3*9 + 16*16*9 + 10*16 weights: 4 bytes each before, 1 byte (+ a 16-entry codebook) after.
    assert packed.size_before - packed.size_after >= 3 * (16 * 3 * 9 + 16 * 16 * 9 + 10 * 16) - 3 * 16 * 4 - 2000
    proto = onnx.load(str(result.path))
    onnx.checker.check_model(proto, full_check=True)
    names = {t.name for t in proto.graph.initializer}
    assert all({f"{n}__codebook", f"{n}__indices"} <= names and n not in names for n in packed.packed)
    assert sum(node.op_type == "Gather" for node in proto.graph.node) == 3
    assert {t.data_type for t in proto.graph.initializer if t.name.endswith("__indices")} == {onnx.TensorProto.UINT8}
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = shared(x).numpy()
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
    # Packing an unshared model's file changes nothing (no initializer has few values).
    plain = convfactor.export_onnx(_model(), x, tmp_path / "plain.onnx", exporter="torchscript")
    assert pack_codebooks(plain.path, tmp_path / "plain_packed.onnx").packed == []


def test_score_counts_the_index_bits() -> None:
    model = _model()
    shared = share_weights(model, bits=4)
    report = sharing_report(shared)
    params = sum(p.numel() for p in model.parameters())
    shared_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    expected_bits = (shared_params * 4 + 3 * 16 * 32 + (params - shared_params) * 32) / params
    assert report.weight_bits() == pytest.approx(expected_bits, rel=1e-12)
    score = report.score(macs=1000)
    assert score.params_term == pytest.approx(expected_bits / 32 * params / 5.6e6, rel=1e-12)
    assert score.score < convfactor.score.challenge_score(params, 1000).score


def test_composes_with_factorize_and_keeps_its_report() -> None:
    model = _model()
    x = torch.randn(1, 3, 8, 8)
    fast = convfactor.factorize(model, "spatial_svd:0.5", x)
    shared = convfactor.share.share_weights(fast, bits=5)
    assert convfactor.get_report(shared) is convfactor.get_report(fast)
    names = [layer.name for layer in convfactor.share.sharing_report(shared).layers]
    assert any(name.endswith(".vertical") for name in names) and any(name.endswith(".horizontal") for name in names)
    with torch.no_grad():
        assert torch.allclose(shared(x), fast(x), rtol=0.1, atol=0.1 * float(fast(x).abs().max()))


def test_cli_convert_share_weights(tmp_path, capsys, monkeypatch) -> None:
    from convfactor.cli import main
    from tests.cli_models import TinyNet, randomized, tiny_net

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    ckpt = tmp_path / "net.pt"
    torch.save(randomized(TinyNet()).state_dict(), ckpt)
    base = ["convert", str(ckpt), "--arch", "tests.cli_models:tiny_net", "--policy", "spatial_svd:0.5",
            "--input-shape", "1,3,8,8", "--json", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "plain.pt"), "--onnx", str(tmp_path / "plain.onnx")]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*base, "--out", str(tmp_path / "shared.pt"), "--onnx", str(tmp_path / "shared.onnx"),
                 "--share-weights", "bits=4"]) == 0
    shared = json.loads(capsys.readouterr().out)
    assert shared["share_weights"]["layers"] and all(layer["clusters"] <= 16
                                                     for layer in shared["share_weights"]["layers"])
    assert shared["onnx"]["packed_codebooks"] == len(shared["share_weights"]["layers"])
    assert shared["onnx"]["file_size"] == (tmp_path / "shared.onnx").stat().st_size < plain["onnx"]["file_size"]
    reloaded = convfactor.load(tmp_path / "shared.pt", arch=tiny_net)
    conv = next(m for m in reloaded.modules() if isinstance(m, nn.Conv2d))
    assert len(torch.unique(conv.weight)) <= 16
    assert main([*base, "--out", str(tmp_path / "bad.pt"), "--share-weights", "bits=four"]) == 2
    assert "expected bits=N, clusters=K or elbow" in capsys.readouterr().err
    assert not (tmp_path / "bad.pt").exists()


def test_finetuning_the_codebooks_keeps_the_sharing() -> None:
    model = _model()
    shared = share_weights(model, bits=2)
    before = {name: torch.unique(shared.get_submodule(name).weight.detach()) for name in ("0", "2", "6")}
    data = [torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    result = convfactor.share.finetune_codebooks(shared, model, data, steps=30, lr=1e-3, loss="mse",
                                                   progress=False)
    assert result.last < result.first
    for name, values in before.items():
        weight = shared.get_submodule(name).weight
        after = torch.unique(weight.detach())
        assert len(after) <= len(values) and not torch.equal(after, values)  # centroids moved, K kept
        assert type(weight) is nn.Parameter and not hasattr(shared.get_submodule(name), "parametrizations")


SCALES = torch.logspace(-1.3, 0.7, 8)  # input channel scales, 0.05 to 5


def _correlated_inputs(count: int, seed: int) -> torch.Tensor:
    """Inputs whose 8 channels follow 2 latent ones, channel c at scale SCALES[c]."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(2, 8, generator=torch.Generator().manual_seed(7)) * SCALES
    z = torch.randn(count, 2, 8, 8, generator=g)
    return torch.einsum("nlhw,lc->nchw", z, mix) + 0.01 * torch.randn(count, 8, 8, 8, generator=g)


@pytest.mark.parametrize("bits", [2, 3])
def test_data_aware_sharing_beats_the_unweighted_one_on_the_output_error(bits: int) -> None:
    # As in a trained network, the first conv's weights absorb the input scales (large on the quiet
    # channels, small on the loud ones): unweighted k-means spends its centroids on the large weights,
    # which barely touch the output; weighted by E[p^2] it resolves the small ones that do.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    with torch.no_grad():
        model[0].weight /= SCALES[None, :, None, None]
    before = model[0].weight.detach().clone()
    calibration, heldout = _correlated_inputs(64, seed=1), _correlated_inputs(64, seed=2)
    plain = share_weights(model, bits=bits)
    aware = share_weights(model, bits=bits, calibration=calibration)
    with torch.no_grad():
        y = model(heldout)
        error_plain = float((plain(heldout) - y).norm() / y.norm())
        error_aware = float((aware(heldout) - y).norm() / y.norm())
    # Measured (aware / unweighted): 0.74 / 1.96 at 2 bits, 0.46 / 0.70 at 3 bits.
    assert error_aware <= 0.8 * error_plain, (error_aware, error_plain)
    for layer in sharing_report(aware).layers:
        assert layer.clusters <= 2**bits
    assert torch.equal(model[0].weight, before)  # the caller's model is not modified
