"""The refit's cross moment read through the layer's weight: W E[p_r p_w^T] without the D x D moment."""

import pytest
import torch
from torch import nn

from convfactor.auto.fits.data_aware import corrected_weight, grouped_weight
from convfactor.auto.statistics.paired import paired_statistics
from convfactor.auto.statistics.patches import Moments, ProjectedMoments, WeightCross


def _inputs(shift: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    reference = [torch.randn(3, 8, 9, 9, generator=g) for _ in range(2)]
    work = [x + shift * torch.randn(x.shape, generator=g) for x in reference]
    return reference, work


@pytest.mark.parametrize("groups", [1, 2])
def test_projected_moments_are_the_weight_times_the_cross_moment(groups):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(groups, 5, 40, generator=g, dtype=torch.float64)
    work, reference = (torch.randn(groups, 300, 40, generator=g, dtype=torch.float64) for _ in range(2))
    full, projected = Moments("full", groups, 40, 1), ProjectedMoments(weight)
    for part in (slice(0, 120), slice(120, 300)):
        full.add(work[:, part], reference[:, part])
        projected.add(work[:, part], reference[:, part])
    want = weight @ full.result().sigma.transpose(1, 2)  # W cross^T, cross = E[p_w p_r^T]
    torch.testing.assert_close(projected.result().of(weight), want, rtol=1e-12, atol=1e-12)


def test_a_weight_cross_answers_for_its_own_weight_only():
    weight = torch.randn(1, 3, 8, dtype=torch.float64)
    cross = WeightCross(weight, torch.zeros(1, 3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="one W"):
        cross.of(weight + 1.0)


@pytest.mark.parametrize("out_channels, projects", [(4, True), (40, False)])  # D = 8 * 9 = 72: 2 O < D or not
def test_paired_statistics_project_where_cheaper_and_the_refit_weight_is_the_same(out_channels, projects):
    layer = nn.Conv2d(8, out_channels, 3, padding=1)
    reference, work = _inputs(0.3, seed=1)
    batches = [(x,) for x in reference]

    def source(inputs):
        return lambda name, index, batch: inputs[index]

    weight = grouped_weight(layer.weight, 1)
    sigma, cross = paired_statistics(layer, "conv", batches, source(reference), source(work), 10_000)
    sigma_p, cross_p = paired_statistics(layer, "conv", batches, source(reference), source(work), 10_000,
                                         weight=weight)
    assert isinstance(cross_p, WeightCross) == projects
    torch.testing.assert_close(sigma_p.sigma, sigma.sigma, rtol=0, atol=0)
    plain = corrected_weight(weight, sigma, cross, 1e-3)
    got = corrected_weight(weight, sigma_p, cross_p, 1e-3)
    assert float((got - plain).norm() / (plain - weight).norm()) < 1e-4  # float32 patch products, summed apart
    assert float((plain - weight).norm() / weight.norm()) > 1e-2  # the inputs moved: there is a correction
