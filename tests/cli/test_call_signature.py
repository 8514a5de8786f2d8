"""A factorized model keeps its original's call signature: through save/load and the CLI's --concrete-arg."""

import json

import pytest
import torch
from torch import nn

import convfactor
from convfactor.cli import main
from convfactor.files.serialize import load, save_factorized
from passes.capture import TracedArgumentError

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x, embed: bool = False, scale=1.0):
        y = torch.relu(self.bn(self.conv(x)))
        if embed:
            return y
        return self.head(y) * scale


def flagged() -> nn.Module:
    torch.manual_seed(0)
    return Flagged().eval()


def test_traced_values_survive_save_and_load(tmp_path):
    model = flagged()
    fast = convfactor.factorize(model, "tucker2:0.5", X, concrete_args={"embed": True})
    path = save_factorized(fast, tmp_path / "fast.pt", arch="tests.cli.test_call_signature:flagged")
    again = load(path, arch=flagged)  # the architecture is given, the traced values come from the file
    with torch.no_grad():
        assert torch.equal(again(X), fast(X))
        assert torch.equal(again(X, embed=True, scale=1.0), fast(X))
    with pytest.raises(TracedArgumentError, match="traced with embed=True"):
        again(X, embed=False)


def test_cli_concrete_arg(tmp_path, capsys):
    checkpoint = tmp_path / "model.pt"
    torch.save(flagged().state_dict(), checkpoint)
    common = ["convert", str(checkpoint), "--arch", "tests.cli.test_call_signature:flagged", "--input-shape", "2,3,8,8",
              "--policy", "tucker2:0.5"]
    assert main(common + ["--out", str(tmp_path / "a.pt"), "--concrete-arg", "embed=true",
                          "--concrete-arg", "scale=2"]) == 0
    report = json.loads((tmp_path / "a.report.json").read_text())
    assert report["factorize"]["extra"]["concrete_args"] == {"embed": True, "scale": 2}
    fast = load(tmp_path / "a.pt", arch=flagged)
    assert fast(X).shape == (2, 8, 8, 8)  # embed=True: the features, not the head
    assert main(common + ["--out", str(tmp_path / "b.pt"), "--concrete-arg", "embed"]) == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err


def test_cli_inspect_calls_forward_with_the_concrete_args(tmp_path, capsys):
    checkpoint = tmp_path / "model.pt"
    torch.save(flagged().state_dict(), checkpoint)
    common = ["inspect", str(checkpoint), "--arch", "tests.cli.test_call_signature:flagged", "--input-shape", "2,3,8,8",
              "--json"]

    def head_macs(extra):
        capsys.readouterr()
        assert main(common + extra) == 0
        layers = {row["name"]: row for row in json.loads(capsys.readouterr().out)["layers"]}
        return layers["head"]["macs"]

    assert head_macs([]) > 0
    assert head_macs(["--concrete-arg", "embed=true"]) is None  # embed=True returns before the head
    assert main(common + ["--concrete-arg", "nope=1"]) == 2
    assert "unexpected keyword argument 'nope'" in capsys.readouterr().err
