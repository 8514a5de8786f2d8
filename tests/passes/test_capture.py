"""capture: tracing, leaf modules, concrete args, and errors that say where and what to do."""

import pytest
import torch
from torch import nn

import convfactor
from convfactor import TraceError
from passes import capture


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value: torch.fx cannot trace this
            return self.conv(x)
        return -self.conv(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = DataDependent()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


class WithFlag(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, double: bool = False):
        y = self.conv(x)
        if double:
            y = y * 2
        return y


def test_trace_keeps_module_names():
    gm = capture(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())).graph_module
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1"]


def test_untraceable_module_is_named_with_hints():
    with pytest.raises(TraceError) as info:
        capture(Net())
    message = str(info.value)
    assert "\n" not in message
    assert "module 'block' (DataDependent)" in message
    assert "control flow" in message
    assert "leaf_modules=['DataDependent']" in message and "trace=False" in message


@pytest.mark.parametrize("leaf", ["DataDependent", "block", DataDependent])
def test_leaf_module_traces_and_inner_conv_is_still_replaced(leaf):
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    out = convfactor.factorize(model, "spatial_svd", x, leaf_modules=[leaf])
    assert isinstance(out, torch.fx.GraphModule)
    report = convfactor.get_report(out)
    assert {d.name for d in report.replaced} == {"stem", "block.conv", "head"}
    torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)


def test_no_trace_mode_replaces_modules_and_says_so():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    out = convfactor.factorize(model, "spatial_svd", x, trace=False)
    report = convfactor.get_report(out)
    assert report.capture == "modules" and not report.fold_batchnorm
    assert any("without a traced graph" in note for note in report.notes)
    assert len(report.replaced) == 3
    torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)


def test_concrete_args_fix_a_flag():
    model = WithFlag().eval()
    x = torch.randn(1, 3, 6, 6)
    with pytest.raises(TraceError, match="control flow"):
        capture(model)
    gm = capture(model, concrete_args={"double": True}).graph_module
    torch.testing.assert_close(gm(x, True), model(x, double=True))
