"""Cheap checks of the multi-head / stateful benchmark adapters (``benchmarks/real``, issue 18).

Nothing here needs the networks' packages: the Silero VAD module runs with random weights, and the
detection helpers and the benchmark's criterion run on made-up numbers.
"""
from __future__ import annotations

import torch

import convfactor
from benchmarks.real.facedata import iou, match_fscore
from benchmarks.real.mtcnn import _batched_nms
from benchmarks.real.runs import accuracy_warnings, criterion, output_errors
from benchmarks.real.silero_vad import SileroVAD, segments_iou_match

torch.set_num_threads(1)


def _vad() -> SileroVAD:
    torch.manual_seed(0)
    return SileroVAD().eval()


def test_silero_vad_state_is_batch_first_and_carried():
    model = _vad()
    x, state = torch.randn(3, 576), torch.zeros(3, 2, 128)
    with torch.no_grad():
        p, next_state = model(x, state)
        p2, _ = model(x, next_state)
    assert p.shape == (3, 1) and next_state.shape == (3, 2, 128)
    assert ((p >= 0) & (p <= 1)).all()
    assert not torch.allclose(p, p2)  # the state matters


def test_silero_vad_factorizes_with_state_calibration():
    model = _vad()
    torch.manual_seed(1)
    calibration = [(torch.randn(16, 576), torch.randn(16, 2, 128) * 0.1) for _ in range(2)]
    example = (calibration[0][0][:1], calibration[0][1][:1])
    fast = convfactor.factorize(model, {"rules": [{"types": ["Conv1d"], "method": "spatial_svd", "rank": 1.0}]},
                                example, calibration=calibration)
    with torch.no_grad():
        for a, b in zip(model(*calibration[1]), fast(*calibration[1])):
            assert torch.allclose(a, b, atol=1e-4)


def test_batched_nms_matches_greedy_rule():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    idxs = torch.tensor([0, 0, 0, 1])  # the last box is in another image: never suppressed by the others
    assert sorted(_batched_nms(boxes, scores, idxs, 0.5).tolist()) == [0, 2, 3]


def test_match_fscore_one_to_one():
    truth = [[(0, 0, 10, 10), (20, 20, 30, 30)]]
    found = match_fscore([[(0, 0, 10, 10), (1, 0, 11, 10)]], truth)  # two boxes on one face: one hit
    assert found["found"] == 1 and found["precision"] == 0.5 and found["recall"] == 0.5
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == 50 / 150


def test_segments_match_at_iou_half():
    assert segments_iou_match([(0, 100), (200, 300)], [(10, 100), (150, 400)]) == 1


class _TwoHeads(torch.nn.Module):
    def forward(self, x):
        return x * 1000.0, x[:, :2]


def test_output_errors_per_output_and_slice():
    x = torch.randn(8, 6)
    model, spec = _TwoHeads(), {"outputs": {"names": ["box", "score"],
                                            "slices": {"box": {"axis": 1, "a": [0, 3], "b": [3, 6]}}}}

    class Broken(torch.nn.Module):
        def forward(self, x):
            return x * 1000.0, -x[:, :2]  # the small head destroyed

    errors = output_errors(model, Broken(), x, spec)
    assert errors["pooled"] < 0.01  # the large head hides the destroyed one in one pooled number
    assert abs(errors["per_output"]["score"] - 2.0) < 1e-9 and errors["per_output"]["box"] == 0.0
    assert errors["per_slice"] == {"box[a]": 0.0, "box[b]": 0.0}


def test_speed_notes_are_not_accuracy_warnings():
    warned = [{"category": "FidelityWarning", "message": "layer conv1: spatial_svd:4 measured 0.85x the original "
               "layer's speed (slower) in onnxruntime at 1 thread(s), and no option of similar cost and error runs "
               "faster"},
              {"category": "SpeedWarning", "message": "whole model measured 0.9x"},
              {"category": "FidelityWarning", "message": "the factorized model is far from the original: relative "
               "output error 0.4 > 0.3"}]
    assert [w["message"][:13] for w in accuracy_warnings(warned)] == ["the factorize"]


def test_criterion_verdicts():
    spec = {"metric_key": "f", "tolerance": 0.05, "higher_is_better": True}
    base = {"row": "auto_macs_0.5", "metric_original": {"f": 0.9}}
    assert criterion({**base, "metric": {"f": 0.88}}, spec)["verdict"] == "kept"
    silent = criterion({**base, "metric": {"f": 0.5}, "fidelity_check": {"passed": True}}, spec)
    assert silent["verdict"].startswith("FALSE PASS") and not silent["ok"]
    said = criterion({**base, "metric": {"f": 0.5}, "fidelity_check": {"passed": False}}, spec)
    assert said["ok"] and said["tool_said_not_kept"]
    overfit_note = criterion({**base, "metric": {"f": 0.9}, "fidelity_check": {"passed": True}, "accuracy_warnings": [
        {"category": "FidelityWarning", "message": "accuracy: the fit overfits its samples: held-out error 0.2"}]}, spec)
    assert overfit_note["verdict"] == "kept"  # a caution, not "accuracy not kept"
    bounded = criterion({**base, "row": "fidelity_macs_0.5", "metric": {"f": 0.5},
                         "fidelity_check": {"passed": False}}, spec)
    assert not bounded["ok"]  # with a bound given, the returned model must keep the metric
