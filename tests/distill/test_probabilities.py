"""Outputs declared ``kind: probabilities`` (already a distribution, e.g. after a final softmax): KL on their log
as the distillation loss, top-1 agreement as for ``scores``, and one-line errors when the declaration is wrong."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convfactor
from convfactor.distill.training import DistillOptions, output_losses
from convfactor.errors import PolicyError
from convfactor.fidelity_spec import parse_fidelity
from convfactor.output_error import ErrorAccumulator, plan_layouts
from tests.distill.small import data, quiet_factorize

PROBABILITIES = {"outputs": {0: {"kind": "probabilities", "axis": 2}}}
SCORES = {"outputs": {0: {"kind": "scores", "axis": 2}}}


class Recognizer(nn.Module):
    """A tiny sequence recognizer ending in a softmax: [N, 3, 8, 8] -> [N, 8 steps, 5 classes] probabilities."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 5, 1)
        self.softmax = nn.Softmax(dim=2)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        steps = self.head(h).mean(2).transpose(1, 2)  # [N, 8 (width: time steps), 5 classes]
        return self.softmax(3.0 * steps)


def _pair(count: int = 16):
    """The recognizer's probabilities on ``count`` inputs, and a student's: the same network perturbed."""
    x = data(count)
    teacher_net, student_net = Recognizer().eval(), Recognizer().eval()
    with torch.no_grad():
        for p in student_net.parameters():
            p.add_(0.2 * torch.randn_like(p))
        return teacher_net(x), student_net(x)


def _loss(spec: dict, teacher: torch.Tensor):
    layouts = plan_layouts(["0"], [teacher.double().numpy()], parse_fidelity(spec))
    (loss,) = output_losses(layouts, [teacher])
    return loss


def test_the_loss_is_kl_of_the_given_probabilities_by_hand():
    teacher, student = _pair()
    loss = _loss(PROBABILITIES, teacher)
    assert loss.kind == "kl_probabilities" and "declared probabilities" in loss.describe()
    by_hand = (teacher * (teacher.log() - student.log())).sum(-1).mean()  # mean over the 16 x 8 positions
    assert float(by_hand) > 1e-3  # the perturbation is visible
    assert float(loss(student, teacher, 1.0)) == pytest.approx(float(by_hand), abs=1e-6)
    assert float(loss(teacher, teacher, 1.0)) == pytest.approx(0.0, abs=1e-6)


def test_scores_on_the_same_outputs_would_apply_a_second_softmax():
    teacher, student = _pair()
    scores = _loss(SCORES, teacher)
    twice_t, twice_s = torch.softmax(teacher, -1), torch.softmax(student, -1)
    softmax_of_probabilities = (twice_t * (twice_t.log() - twice_s.log())).sum(-1).mean()
    assert float(scores(student, teacher, 1.0)) == pytest.approx(float(softmax_of_probabilities), abs=1e-6)
    right = float(_loss(PROBABILITIES, teacher)(student, teacher, 1.0))
    assert float(scores(student, teacher, 1.0)) < right / 5  # the second softmax flattens both: a far weaker signal


def test_an_underflowed_probability_gets_a_finite_loss_and_gradient():
    teacher = torch.tensor([[[1.0, 0.0, 0.0]]])  # a softmax that underflowed to exact zeros
    student = torch.tensor([[[0.5, 0.5, 0.0]]], requires_grad=True)
    loss = _loss(PROBABILITIES, teacher)(student, teacher, 1.0)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(-torch.log(torch.tensor(0.5)).item(), abs=1e-6)  # 1 * (log 1 - log 0.5)
    assert torch.isfinite(student.grad).all()


def test_agreement_is_the_argmax_per_position_as_for_scores():
    teacher, student = _pair()
    expected = float((teacher.argmax(2) == student.argmax(2)).double().mean())
    assert 0 < expected < 1  # some positions disagree
    measured = {}
    for kind, spec in (("probabilities", PROBABILITIES), ("scores", SCORES)):
        accumulator = ErrorAccumulator(plan_layouts(["0"], [teacher.double().numpy()], parse_fidelity(spec)))
        accumulator.add([teacher], [student])
        measured[kind] = accumulator.result()["agreement"]
    assert measured["probabilities"] == pytest.approx(expected) and measured["scores"] == measured["probabilities"]
    auto = ErrorAccumulator(plan_layouts(["0"], [teacher.double().numpy()], None))
    auto.add([teacher], [student])
    assert auto.result()["agreement"] is None  # undeclared: no classes


def test_the_default_axis_is_the_class_axis_of_a_sequence_output_and_a_wrong_one_is_named():
    teacher, _ = _pair()  # [16, 8 steps, 5 classes]: the shorter axis, 2, is the default feature axis
    default = plan_layouts(["0"], [teacher.double().numpy()], parse_fidelity({"outputs": {0: {"kind": "probabilities"}}}))
    assert default[0].axis == 2
    wrong = parse_fidelity({"outputs": {0: {"kind": "probabilities", "axis": 1}}})  # the time steps
    with pytest.raises(ValueError, match=r"'0': kind probabilities needs values in \[0, 1\] summing to 1 along axis 1"):
        plan_layouts(["0"], [teacher.double().numpy()], wrong)


def test_logits_declared_probabilities_fail_before_any_work_with_one_line():
    model = Recognizer().eval()
    model.softmax = nn.Identity()  # now it returns the logits
    x = data(48)
    policy = {"rules": [{"types": ["Conv2d"], "method": "spatial_svd"}], "target": {"macs": 0.5},
              "fidelity": PROBABILITIES}
    with pytest.raises(PolicyError) as error:
        quiet_factorize(model, policy, x[:1], calibration=x)
    text = str(error.value)
    assert "\n" not in text and "kind probabilities needs values in [0, 1]" in text and "kind scores" in text


def test_a_softmax_network_declared_probabilities_distils_with_kl_and_improves_held_out():
    model, x = Recognizer().eval(), data(96)
    policy = {"rules": [{"types": ["Conv2d"], "method": "spatial_svd"}], "target": {"macs": 0.3},
              "fidelity": PROBABILITIES}
    fast = quiet_factorize(model, policy, x[:1], calibration=x, distill=DistillOptions(steps=60, lr=1e-3))
    record = convfactor.get_report(fast).extra["distill"]
    assert record["output_losses"] == ["0: kl on log probabilities (declared probabilities)"]
    assert record["returned"] == "distilled" and record["select_after"] < record["select_before"]
    assert record["after"]["rel_error"] < record["before"]["rel_error"]
    assert all("seconds" in judged for judged in record["select"])
    check = convfactor.get_report(fast).extra["fidelity_check"]
    assert check["agreement"] is not None  # measured on the declared class axis


def _tiny_inputs(tmp_path, count: int = 32):
    path = tmp_path / "c.pt"
    torch.save(torch.randn(count, 3, 8, 8, generator=torch.Generator().manual_seed(1)), path)
    return path


def _convert(cli, ckpt, *extra):
    return cli("convert", ckpt, "--arch", "tests.cli_models:tiny_net", "--input-shape", "1,3,8,8",
               "--policy", "spatial_svd:0.5", "--out", ckpt.with_name("fast.pt"), *extra)


def test_cli_class_probabilities_declares_the_kind(cli, ckpt, tmp_path, calls, monkeypatch):
    import convfactor.output_error as output_error

    monkeypatch.setattr(output_error, "_check_probabilities", lambda *args: None)  # tiny_net returns logits
    code, _, err = _convert(cli, ckpt, "--calibration", _tiny_inputs(tmp_path), "--class-probabilities", "0")
    assert code == 0, err
    assert calls[0]["policy"].fidelity.output_spec(0).kind == "probabilities"


@pytest.mark.parametrize("extra, message", [
    (("--class-probabilities", "0"), "error: policy: fidelity outputs '0': kind probabilities needs values in [0, 1]"),
    (("--class-probabilities", "0", "--class-scores", "0"),
     "error: --class-scores and --class-probabilities both name output '0'"),
])
def test_cli_misdeclared_probabilities_are_one_error_line(cli, ckpt, tmp_path, extra, message):
    code, _, err = _convert(cli, ckpt, "--calibration", _tiny_inputs(tmp_path), *extra)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert not ckpt.with_name("fast.pt").exists()
