"""``method: auto`` on a 1x1 conv scores svd alone of svd, spatial_svd and Tucker-2: the other two are the
same approximation (spatial SVD) or a costlier one (Tucker-2) there, and scoring them left the choice
between equals to float rounding."""

import pytest
import torch
from torch import nn

from convfactor.auto.options import AutoOptions
from convfactor.auto.selection.plans import plan_layers
from convfactor.costs import count_params
from convfactor.methods.base import get_method
from convfactor.policy import Policy


def _methods(net, policy, opts=None):
    return {p.name: [m.name for m in p.methods] for p in plan_layers(net, Policy.from_any(policy),
                                                                     opts or AutoOptions())}


def test_auto_leaves_spatial_svd_and_tucker2_of_a_1x1_conv_to_svd():
    net = nn.Sequential(nn.Conv2d(16, 32, 1), nn.Conv2d(32, 32, 3, padding=1), nn.Conv1d(8, 8, 1),
                        nn.Conv2d(32, 8, 1, groups=8))
    found = _methods(net, {"rules": [{"method": "auto"}]})
    for name in ("0", "2", "3"):
        assert "svd" in found[name] and not {"spatial_svd", "tucker2"} & set(found[name]), (name, found[name])
    assert {"spatial_svd", "tucker2"} <= set(found["1"])
    plans = plan_layers(net, Policy.from_any({"rules": [{"method": "auto"}]}), AutoOptions())
    assert any("spatial_svd left to svd" in n and "tucker2 left to svd" in n for n in plans[0].notes)


def test_an_explicit_method_or_an_auto_list_without_svd_keeps_them():
    net = nn.Sequential(nn.Conv2d(16, 32, 1))
    assert _methods(net, {"rules": [{"method": "tucker2"}]})["0"] == ["tucker2"]
    assert _methods(net, {"rules": [{"method": "auto"}]}, AutoOptions(auto_methods=("spatial_svd", "tucker2"))) \
        == {"0": ["spatial_svd", "tucker2"]}


@pytest.mark.parametrize("rank", [1, 5, 12])
def test_on_a_1x1_conv_spatial_svd_is_svd_and_tucker2_no_closer_for_more(rank):
    torch.manual_seed(rank)
    conv = nn.Conv2d(16, 24, 1, bias=True).double()
    x = torch.randn(4, 16, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        ref = conv(x)
        svd = get_method("svd").decompose(conv, rank)
        spatial = get_method("spatial_svd").decompose(conv, rank)
        tucker = get_method("tucker2").decompose(conv, (rank, rank))
        best = (svd(x) - ref).norm()
        assert (spatial(x) - svd(x)).norm() <= 1e-10 * ref.norm()
        assert count_params(spatial) == count_params(svd)
        assert (tucker(x) - ref).norm() >= best * (1 - 1e-10)
        assert count_params(tucker) > count_params(svd)
