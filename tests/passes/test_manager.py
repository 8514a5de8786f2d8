"""run_passes, the generic factorize_layers pass and set_submodule, on their own."""

import pytest
import torch
from torch import nn

from passes import PassFailed, PassResult, capture, cleanup, factorize_layers, run_passes, set_submodule
from passes.errors import PassInputError, one_line


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 2, 1)))


def test_run_passes_chains_and_names_the_failed_pass():
    gm = capture(_net()).graph_module

    def broken(module):
        raise KeyError("boom")

    with pytest.raises(PassFailed, match=r"pass 'broken' failed \(passes run before it: cleanup\): 'boom'"):
        run_passes(gm, [cleanup, broken])


def test_run_passes_lets_user_errors_through():
    def refuses(module):
        raise PassInputError("your model is wrong")

    with pytest.raises(PassInputError, match="your model is wrong") as info:
        run_passes(_net(), [refuses])
    assert not isinstance(info.value, PassFailed)


def test_factorize_layers_installs_what_the_caller_builds():
    net = _net()
    x = torch.randn(1, 3, 8, 8)
    expected = net(x)
    gm = capture(net).graph_module
    builds = {"2.0": lambda layer: nn.Sequential(layer), "0": lambda layer: nn.Sequential(layer)}
    gm, results = run_passes(gm, [lambda m: factorize_layers(m, builds), cleanup])
    changes = results[0].changes
    assert [c.name for c in changes] == ["2.0", "0"]  # in the order given
    assert isinstance(gm.get_submodule("0"), nn.Sequential) and gm.get_submodule("0.0") is changes[1].old
    assert torch.equal(gm(x), expected)


def test_factorize_layers_with_nothing_to_do_is_unmodified():
    result = factorize_layers(_net(), {})
    assert isinstance(result, PassResult) and not result.modified and result.changes == []


def test_set_submodule_at_top_level_and_nested():
    net = _net()
    set_submodule(net, "1", nn.Identity())
    set_submodule(net, "2.0", nn.Identity())
    assert isinstance(net[1], nn.Identity) and isinstance(net[2][0], nn.Identity)
    with pytest.raises(AttributeError):
        set_submodule(net, "missing.conv", nn.Identity())


@pytest.mark.parametrize(("what", "kwargs", "expected"), [
    (ValueError("first\nsecond"), {}, "first"),
    (ValueError("first\n  second"), {"whole": True}, "first second"),
    (ValueError("\x1b[31mred\x1b[0m"), {"with_type": True}, "ValueError: red"),
    (KeyError(), {"with_type": True}, "KeyError"),
    (RuntimeError(""), {}, "RuntimeError"),
    ("  a\n b  ", {"whole": True}, "a b"),
    ("", {}, "unknown error"),
])
def test_one_line(what, kwargs, expected):
    assert one_line(what, **kwargs) == expected
