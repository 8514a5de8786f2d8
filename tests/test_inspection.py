"""convfactor.inspect_model: per-layer facts and spectra as plain data, the model left as it was."""

import json

import pytest
import torch
from torch import nn

import convfactor
from convfactor.costs import per_layer_macs
from convfactor.errors import ConvfactorError
from convfactor.methods import get_method
from convfactor.ranks import fraction_to_rank, kept_energy
from tests.cli_models import TinyNet, randomized

X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def net():
    return randomized(TinyNet()).eval()


def test_layers_params_and_macs_match_the_counters(net):
    table = convfactor.inspect_model(net, X, methods=["spatial_svd"])
    assert [row["name"] for row in table["layers"]] == ["conv1", "conv2", "proj", "fc"]
    macs = per_layer_macs(net, (X,))
    for row in table["layers"]:
        layer = net.get_submodule(row["name"])
        assert row["params"] == sum(p.numel() for p in layer.parameters())
        assert row["macs"] == macs[row["name"]]
    assert table["totals"] == {"params": sum(p.numel() for p in net.parameters()),
                               "layer_macs": sum(macs.values()), "layers": 4}
    assert sum(row["macs_share"] for row in table["layers"]) == pytest.approx(1.0, abs=1e-12)
    conv2 = table["layers"][1]
    assert (conv2["in"], conv2["out"], conv2["kernel"], conv2["stride"], conv2["output_shape"]) == (
        8, 16, [3, 3], [2, 2], [1, 16, 4, 4])
    assert table["input_shape"] == [1, 3, 8, 8] and table["input_shapes"] == [[1, 3, 8, 8]]
    json.dumps(table)  # plain data


def test_energy_is_the_spectrum_kept_at_each_fraction(net):
    table = convfactor.inspect_model(net, X, methods=["spatial_svd", "svd"], fractions=(0.25, 1.0))
    method = get_method("spatial_svd")
    (spectrum,) = method.spectra(net.conv1)
    full = method.full_rank(net.conv1)
    expected = [kept_energy(spectrum, fraction_to_rank(f, full)) for f in (0.25, 1.0)]
    assert table["layers"][0]["energy"]["spatial_svd"] == pytest.approx(expected, abs=1e-12)
    assert table["layers"][0]["energy"]["spatial_svd"][1] == pytest.approx(1.0, abs=1e-9)  # full rank keeps all
    assert table["layers"][0]["energy"]["spatial_svd"][0] < 1.0
    fc = table["layers"][3]["energy"]["spatial_svd"]  # spatial_svd cannot represent a Linear: says why
    assert set(fc) == {"unsupported"} and "Linear" in fc["unsupported"]
    assert isinstance(table["layers"][3]["energy"]["svd"], list)


def test_default_methods_are_every_registered_method(net):
    assert convfactor.inspect_model(net, X)["methods"] == convfactor.available_methods()


def test_the_model_is_not_changed_even_in_train_mode(net):
    net.train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    convfactor.inspect_model(net, torch.randn(4, 3, 8, 8), methods=["svd"])
    assert all(module.training for module in net.modules())  # flags restored
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())  # BatchNorm stats untouched


def test_a_sequence_of_inputs_is_accepted():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(5, 3)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    table = convfactor.inspect_model(TwoInputs(), (torch.zeros(2, 4), torch.zeros(2, 5)), methods=["svd"])
    assert table["input_shapes"] == [[2, 4], [2, 5]]
    assert [row["macs"] for row in table["layers"]] == [12, 15]


@pytest.mark.parametrize("kwargs, message", [
    ({"example_inputs": None}, "needs example_inputs"),
    ({"example_inputs": X, "methods": ["no_such_method"]}, "unknown method 'no_such_method'"),
    ({"example_inputs": X, "fractions": (0.5, 1.5)}, "fractions must be in (0, 1]"),
])
def test_user_mistakes_are_one_clear_error(net, kwargs, message):
    with pytest.raises(ConvfactorError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        convfactor.inspect_model(net, **kwargs)
