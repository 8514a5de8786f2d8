"""capture: tracing, leaf modules, concrete args, and errors that say where and what to do."""

import copy
import inspect
import pickle

import pytest
import torch
from torch import nn

import convfactor
from passes import capture
from passes.capture import CONCRETE_ARGS_META, TracedArgumentError
from passes.errors import CaptureError


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
    with pytest.raises(CaptureError) as info:
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
    gm = capture(model, concrete_args={"double": True}).graph_module
    torch.testing.assert_close(gm(x, True), model(x, double=True))
    torch.testing.assert_close(gm(x), model(x, double=True))  # the traced value is the default now
    with pytest.raises(TracedArgumentError, match=r"traced with double=True and cannot run with double=False"):
        gm(x, double=False)


def test_plain_defaults_are_traced_and_the_signature_is_kept():
    torch.manual_seed(0)
    model = WithFlag().eval()
    x = torch.randn(2, 3, 6, 6)
    fast = convfactor.factorize(model, "tucker2", x)  # full rank: same function
    assert list(inspect.signature(fast.forward).parameters) == ["x", "double"]
    with torch.no_grad():
        torch.testing.assert_close(fast(x, double=False), model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast(x, False), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(TracedArgumentError) as info:
        fast(x, double=True)
    message = str(info.value)
    assert "\n" not in message and "double=False" in message and "concrete_args={'double': True}" in message
    assert "--concrete-arg double=true" in message
    report = convfactor.get_report(fast)
    assert report.extra["concrete_args"] == {"double": False}
    assert any("'double'" in note and "default False" in note for note in report.notes)


class Options(nn.Module):
    """Non-tensor arguments of every plain type, and an optional second tensor."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, y=None, mode: str = "sum", scale=2.0, steps=1):
        out = self.conv(x)
        if y is not None:
            out = out + y
        for _ in range(steps):
            out = out * scale if mode == "sum" else out - scale
        return out


def test_example_inputs_are_never_made_concrete():
    model = Options().eval()
    x, y = torch.randn(1, 3, 5, 5), torch.randn(1, 4, 5, 5)
    one = capture(model, n_inputs=1).graph_module
    assert one.meta[CONCRETE_ARGS_META] == {"y": None, "mode": "sum", "scale": 2.0, "steps": 1}
    two = capture(model, n_inputs=2).graph_module
    assert two.meta[CONCRETE_ARGS_META] == {"mode": "sum", "scale": 2.0, "steps": 1}
    torch.testing.assert_close(two(x, y), model(x, y))
    torch.testing.assert_close(one(x, None, "sum", 2.0, 1), model(x))
    with pytest.raises(TracedArgumentError, match="traced with y=None"):
        one(x, y)
    with pytest.raises(TracedArgumentError, match="traced with steps=1 and cannot run with steps=True"):
        one(x, steps=True)  # a bool is not the int it equals


def test_kept_signature_survives_pickle_deepcopy_and_dead_code_elimination():
    model = WithFlag().eval()
    x = torch.randn(1, 3, 6, 6)
    gm = capture(model).graph_module
    gm.graph.eliminate_dead_code()
    gm.recompile()
    for clone in (gm, copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):
        torch.testing.assert_close(clone(x, double=False), model(x))
        with pytest.raises(TracedArgumentError):
            clone(x, double=True)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x, mode, flag: bool = False, extra=(1, 2)):
        y = self.conv(x)
        if flag:
            y = -y
        return y * 2 if mode == "double" else y


def test_a_non_tensor_argument_that_stops_tracing_is_named_with_the_fix():
    with pytest.raises(CaptureError) as info:
        capture(Branchy(), n_inputs=1)
    message = str(info.value)
    assert "\n" not in message
    assert "argument 'mode'" in message
    assert "concrete_args={'mode': VALUE}" in message and "--concrete-arg mode=VALUE" in message
    model = Branchy().eval()
    gm = capture(model, concrete_args={"mode": "double"}).graph_module  # flag: traced with its default
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(gm(x, "double"), model(x, "double"))
    torch.testing.assert_close(gm(x, mode="double", flag=False), model(x, "double"))


def test_a_tensor_branch_is_not_blamed_on_an_argument():
    with pytest.raises(CaptureError) as info:
        capture(Net(), n_inputs=1)
    assert "argument" not in str(info.value) and "module 'block'" in str(info.value)


class _StringAnnotated(nn.Module):
    """Annotations as strings, as ``from __future__ import annotations`` makes every one of them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        return self.conv(x)


def test_a_capture_of_a_network_with_string_annotations_pickles():
    traced = capture(_StringAnnotated().eval(), n_inputs=1).graph_module
    again = pickle.loads(pickle.dumps(traced))  # torch.fx put 'torch.Tensor' (a str) in its code's globals
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(again(x), traced(x))
    fast = convfactor.factorize(_StringAnnotated().eval(), "svd:0.5", x[:1])
    assert isinstance(pickle.loads(pickle.dumps(fast)), nn.Module)


def test_a_capture_with_concrete_args_rebuilds_in_another_process_with_its_check():
    # A worker process rebuilds a traced network from its code with torch.fx's plain tracer
    # (convfactor.auto.selection.tasks.portable), which calls the argument check with a Proxy.
    from convfactor.auto.selection.tasks import portable

    model = WithFlag().eval()
    x = torch.randn(1, 3, 6, 6)
    gm = capture(model, concrete_args={"double": True}).graph_module
    clone = pickle.loads(portable(gm))
    torch.testing.assert_close(clone(x), model(x, double=True))
    with pytest.raises(TracedArgumentError, match="traced with double=True"):
        clone(x, double=False)
