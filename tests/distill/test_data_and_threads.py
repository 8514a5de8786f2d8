"""What a distillation runs on: ``DistillOptions.data`` cut to ``MAX_DISTILL_SAMPLES``, every batch once per pass
in a seeded order, and ``threads`` set while it runs and restored after."""

from __future__ import annotations

import torch
from torch import nn

import convfactor
from convfactor.distill.criterion import Criterion
from convfactor.distill.result import MAX_DISTILL_SAMPLES
from convfactor.distill.training import DistillOptions, distill_model
from convfactor.output_checker import OutputChecker
from tests.distill.small import CUT, data, quiet_factorize, small_net


def test_distill_data_beyond_the_cap_is_cut_to_it():
    model, x = small_net(), data()
    many = data(MAX_DISTILL_SAMPLES + 40, seed=5)
    fast = quiet_factorize(model, CUT, x[:1], calibration=x, distill=DistillOptions(steps=1, data=many))
    assert convfactor.get_report(fast).extra["distill"]["data"] == {"source": "distill data",
                                                                     "samples": MAX_DISTILL_SAMPLES}


class Recording(nn.Module):
    """The teacher, keeping the first sample index (stored in the input) of every batch it runs."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x):
        self.seen.append([int(v) for v in x[:, 0, 0, 0]])
        return self.net(x)


def _run(teacher: nn.Module, x: torch.Tensor, options: DistillOptions, error=lambda model: 1.0):
    checker = OutputChecker(teacher, [(x,)], "select samples")
    return distill_model(small_net(1), teacher, [(x,)], checker, options, criterion=Criterion(checker, error=error))


def test_every_batch_once_per_pass_in_a_seeded_order():
    x = data(20)
    x[:, 0, 0, 0] = torch.arange(20.0)  # each sample says which it is
    orders = []
    for seed in (0, 0, 1):
        teacher = Recording(small_net(0))
        _run(teacher, x, DistillOptions(steps=10, batch_size=4, check_every=100, seed=seed))
        steps = teacher.seen[-10:]  # one call per step, after the checker's and the loss scales' calls
        chunks = [[4 * c + i for i in range(4)] for c in range(5)]
        assert sorted(steps[:5]) == chunks and sorted(steps[5:]) == chunks  # two passes, each batch once
        orders.append(steps)
    assert orders[0] == orders[1] and orders[0] != orders[2]  # the seed, and only the seed, sets the order


def test_threads_are_set_while_distilling_and_restored_after():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []
    try:
        x = data(16)
        _run(small_net(0), x, DistillOptions(steps=4, check_every=2, threads=1),
             error=lambda model: seen.append(torch.get_num_threads()) or 1.0)
        assert seen == [1, 1, 1] and torch.get_num_threads() == 2  # judged at steps 0, 2, 4
    finally:
        torch.set_num_threads(before)
