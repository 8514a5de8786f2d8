"""check_fidelity: passes when the models agree, fails on exactly the criteria a corruption breaks."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from convfactor.errors import ConvfactorError
from convfactor.fidelity_spec import parse_fidelity
from convfactor.methods import get_method
from convfactor.output_error import plan_layouts
from convfactor.runtime import fidelity
from convfactor.runtime.export import export_onnx
from convfactor.runtime.fidelity import check_fidelity, output_metrics

EXPORTER = "torchscript"  # fast; the dynamo exporter is covered in test_onnx_export


def _classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    ).eval()


def _failed(report) -> set[str]:
    return {name.split(".", 1)[1] for name in report.failed_criteria()}


def test_identical_models_pass_every_criterion():
    model = _classifier()
    report = check_fidelity(model, copy.deepcopy(model), input_shape=(4, 3, 8, 8), n_samples=8,
                            max_abs_error=1e-6, exporter=EXPORTER, outputs={0: {"kind": "scores"}})
    assert report.passed and report.verdict == "pass"
    (output,) = report.outputs
    assert output.metrics["rel_l2_error"] <= 1e-6
    assert output.metrics["cosine"] >= 1 - 1e-6
    assert {c.name for c in output.criteria} == {"max_abs_error", "worst_slice_rel_error", "cosine", "snr_db",
                                                 "top1_agreement", "top5_overlap"}
    assert report.inputs_generated and "standard-normal" in report.input_description
    assert report.n_samples == 8 and report.n_batches == 2
    assert [c.model for c in report.export_checks] == ["original", "factorized"]
    assert all(c.rel_l2_error <= 1e-5 for c in report.export_checks)
    json.dumps(report.to_dict(), allow_nan=False)  # infinite SNR must still be valid JSON
    assert "PASS" in report.render()


def test_factorized_model_at_full_rank_passes_and_reduced_rank_is_measured():
    model = _classifier()
    method = get_method("spatial_svd")
    exact, reduced = copy.deepcopy(model), copy.deepcopy(model)
    exact[2] = method.decompose(model[2], method.resolve_rank(model[2]))
    reduced[2] = method.decompose(model[2], 1)
    x = torch.randn(8, 3, 8, 8)
    report = check_fidelity(model, exact, x, max_rel_l2_error=1e-5, exporter=EXPORTER)
    assert report.passed, report.render()
    assert not report.inputs_generated and report.n_samples == 8
    lossy = check_fidelity(model, reduced, x, max_rel_l2_error=1e-5, exporter=EXPORTER)
    assert lossy.export_passed and "worst_slice_rel_error" in _failed(lossy)


def test_small_corruption_fails_only_the_strict_abs_tolerance():
    model = _classifier()
    corrupted = copy.deepcopy(model)
    with torch.no_grad():
        corrupted[2].weight.mul_(1.001)
    report = check_fidelity(model, corrupted, input_shape=(8, 3, 8, 8), n_samples=16, max_abs_error=1e-7,
                            exporter=EXPORTER)
    assert report.export_passed
    assert _failed(report) == {"max_abs_error"}
    assert report.verdict == "fail: factorization"


def test_large_corruption_fails_the_error_criteria():
    model = _classifier()
    corrupted = copy.deepcopy(model)
    with torch.no_grad():
        corrupted[2].weight.copy_(torch.randn_like(corrupted[2].weight))
    report = check_fidelity(model, corrupted, input_shape=(8, 3, 8, 8), n_samples=16, exporter=EXPORTER)
    assert not report.passed and report.export_passed
    assert {"worst_slice_rel_error", "cosine", "snr_db"} <= _failed(report)
    assert "FAIL" in report.render()


def test_swapped_top_classes_fail_only_top1_agreement():
    # Logits [10, 9.9, small...]: swapping classes 0 and 1 barely moves the vector but flips every argmax.
    torch.manual_seed(0)
    identity = nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(8))
    swapped = copy.deepcopy(identity)
    with torch.no_grad():
        swapped.weight.copy_(torch.eye(8)[[1, 0, 2, 3, 4, 5, 6, 7]])
    x = torch.randn(16, 8) * 0.01
    x[:, 0] += 10.0
    x[:, 1] += 9.9
    assert check_fidelity(identity, swapped, x, exporter=EXPORTER).passed  # not declared: nothing to agree on
    report = check_fidelity(identity, swapped, x, exporter=EXPORTER, outputs={0: {"kind": "scores"}})
    assert _failed(report) == {"top1_agreement"}
    assert report.outputs[0].metrics["top1_agreement"] == 0.0
    assert report.outputs[0].metrics["top5_overlap"] == 1.0


def test_export_problem_is_reported_apart_from_factorization(monkeypatch):
    """An export that does not reproduce its module fails the export check, not the comparison."""
    model = _classifier()
    real_prepare = fidelity.prepare_onnx

    def prepare_with_faulty_export(module, example, directory, name, **kwargs):
        if name != "factorized":
            return real_prepare(module, example, directory, name, **kwargs)
        broken = copy.deepcopy(module)
        with torch.no_grad():
            broken[-1].bias.add_(1.0)
        prepared = real_prepare(broken, example, directory, name, **kwargs)
        return fidelity.PreparedModel(prepared.path, module, prepared.export)  # claims to be `module`

    monkeypatch.setattr(fidelity, "prepare_onnx", prepare_with_faulty_export)
    report = check_fidelity(model, copy.deepcopy(model), input_shape=(4, 3, 8, 8), n_samples=4,
                            exporter=EXPORTER)
    assert not report.export_passed and report.verdict == "fail: export"
    assert [c.passed for c in report.export_checks] == [True, False]
    assert "not trustworthy" in report.render()


def test_onnx_paths_and_multiple_outputs(tmp_path):
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(4, 6)

        def forward(self, x):
            features = self.body(x).mean((2, 3))
            return self.head(features), features

    model = TwoHeads().eval()
    x = torch.randn(2, 3, 6, 6)
    a = export_onnx(model, x, tmp_path / "a.onnx", exporter=EXPORTER).path
    b = export_onnx(copy.deepcopy(model), x, tmp_path / "b.onnx", exporter=EXPORTER).path
    # input shape read from the file, batch 8; the first output declared as class scores by its ONNX name
    report = check_fidelity(a, b, n_samples=8, outputs={"output_0": {"kind": "scores"}})
    assert report.passed and report.export_checks == ()
    assert [o.name for o in report.outputs] == ["output_0", "output_1"]
    assert report.outputs[0].shape == (8, 6)
    assert "top5_overlap" in report.outputs[0].metrics  # 6 classes
    assert "top1_agreement" not in report.outputs[1].metrics  # the features are not class scores
    assert report.models["original"] == {"given_as": "onnx", "path": str(a)}


def test_user_mistakes_are_convfactor_errors():
    model = _classifier()
    with pytest.raises(ConvfactorError, match="input_shape"):
        check_fidelity(model, model, exporter=EXPORTER)
    with pytest.raises(ConvfactorError):  # (x, y) pairs: the model takes one input
        check_fidelity(model, model, [(torch.randn(2, 3, 8, 8), torch.zeros(2))], exporter=EXPORTER)
    with pytest.raises(ConvfactorError, match="tolerance"):
        check_fidelity(model, model, torch.randn(2, 3, 8, 8), min_cosine="high", exporter=EXPORTER)
    with pytest.raises(ConvfactorError, match="empty"):
        check_fidelity(model, model, [], exporter=EXPORTER)


def test_metrics_by_hand():
    a = np.array([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0]])
    b = np.array([[3.0, 4.0, 1.0], [0.0, 1.0, 0.0]])
    assert "top1_agreement" not in output_metrics(a, b)  # an undeclared output is not argmaxed
    m = output_metrics(a, b, plan_layouts(["y"], [a], parse_fidelity({"outputs": {0: {"kind": "scores"}}}))[0])
    assert m["max_abs_error"] == 1.0
    assert m["rel_l2_error"] == pytest.approx(np.sqrt(3) / np.sqrt(26), rel=1e-12)
    assert m["snr_db"] == pytest.approx(10 * np.log10(26 / 3), rel=1e-12)
    assert m["cosine"] == pytest.approx((25 / (5 * np.sqrt(26)) + 0.0) / 2, rel=1e-12)
    assert m["cosine_min"] == 0.0
    assert m["top1_agreement"] == 0.5
    assert "top5_overlap" not in m  # 3 classes: top-5 says nothing
    zero = output_metrics(np.zeros((2, 2)), np.zeros((2, 2)))
    assert zero["rel_l2_error"] == 0.0 and zero["cosine"] == 1.0 and zero["snr_db"] == float("inf")
