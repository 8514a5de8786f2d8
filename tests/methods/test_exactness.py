"""Every registered method, at full rank (rank=1.0), reproduces the layer it factorizes.

The methods come from the registry, so a new method file is tested here as soon as it registers.
A method may reject a layer (``unsupported_reason``), but not one of the layers ``must_support``
lists for it. Checked for each accepted layer: the module's output equals the layer's (float64
<= 1e-10, float32 <= 1e-5 relative), ``dense_weight()``/``dense_bias()`` equal the layer's, the
reconstruction error never grows with the rank, and the module traces with torch.fx.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx

from convfactor.methods import available_methods, get_method

from .conftest import FLOAT32_TOLERANCE, FLOAT64_TOLERANCE, LayerCase, factorize, relative_error

METHODS = available_methods()


# -- which layers each method must accept -----------------------------------------------------------
def _dense_conv(case: LayerCase) -> bool:
    return case.is_conv and not case.is_depthwise


def _kxk_ungrouped_zero_padded(case: LayerCase) -> bool:
    return case.is_conv and case.kernel_volume > 1 and case.groups == 1 and case.padding_mode == "zeros"


# The least each method must accept (it may accept more; whatever it accepts must be exact).
MUST_SUPPORT = {
    "spatial_svd": _dense_conv,
    "tucker2": _dense_conv,
    "svd": lambda case: case.kind == "Linear" or (_dense_conv(case) and case.kernel_volume == 1),
    "cp": _kxk_ungrouped_zero_padded,
    "depthwise": _kxk_ungrouped_zero_padded,
    "grouped": _kxk_ungrouped_zero_padded,
    "channel_svd": lambda case: _dense_conv(case) and case.kernel_volume > 1,
    "shift": lambda case: case.is_conv and case.kernel_volume > 1 and case.groups == 1,
    "dictionary": lambda case: _dense_conv(case) and case.kernel_volume > 1,
    "sal": lambda case: case.is_conv and case.kernel_volume > 1,
}


def must_support(method_name: str, case: LayerCase) -> bool:
    return MUST_SUPPORT.get(method_name, lambda case: False)(case)


# -- the configuration space ------------------------------------------------------------------------
def _cases() -> list[LayerCase]:
    cases: list[LayerCase] = []
    alternate = itertools.cycle([True, False])  # bias on every other case covers both

    def add(kind, shape, stride, padding, dilation, padding_mode="zeros"):
        c_in, c_out, kernel, groups = shape
        if padding == "same" and any(s != 1 for s in stride):
            return  # PyTorch forbids 'same' with stride > 1
        cases.append(LayerCase(kind, c_in, c_out, kernel, stride, padding, dilation, groups,
                               next(alternate), padding_mode))

    # Conv2d k x k: every stride x padding x dilation; C_out=3 < k_h*k_w=9; groups 2; an even kernel.
    conv2d_shapes = [(4, 6, (3, 3), 1), (5, 3, (3, 3), 1), (4, 6, (3, 3), 2), (3, 5, (2, 3), 1)]
    strides = [(1, 1), (2, 2), (2, 1)]
    paddings = [(0, 0), (1, 1), (1, 2), "same"]
    for shape, stride, padding, dilation in itertools.product(conv2d_shapes, strides, paddings,
                                                              [(1, 1), (2, 2)]):
        add("Conv2d", shape, stride, padding, dilation)
    # Conv2d 1x1 (what svd takes): stride and padding still apply.
    for shape, stride, padding in itertools.product([(6, 4, (1, 1), 1), (4, 6, (1, 1), 2)], strides, paddings):
        add("Conv2d", shape, stride, padding, (1, 1))
    # Conv1d, including C_out=2 < k=3, groups 2 and a 1x1.
    for shape, stride, padding, dilation in itertools.product(
        [(4, 6, (3,), 1), (5, 2, (3,), 1), (4, 6, (3,), 2)], [(1,), (2,)], [(0,), (1,), (2,), "same"],
        [(1,), (2,)],
    ):
        add("Conv1d", shape, stride, padding, dilation)
    for stride, padding in itertools.product([(1,), (2,)], [(0,), (1,)]):
        add("Conv1d", (6, 4, (1,), 1), stride, padding, (1,))
    # Non-zero padding modes on a subset of geometries.
    modes = ["reflect", "circular", "replicate"]
    geometries_2d = [((1, 1), (1, 1), (1, 1)), ((2, 2), (1, 2), (1, 1)), ((2, 1), (1, 1), (2, 2)),
                     ((1, 1), "same", (2, 2))]
    for mode, (stride, padding, dilation), shape in itertools.product(
        modes, geometries_2d, [(4, 6, (3, 3), 1), (4, 6, (3, 3), 2), (6, 4, (1, 1), 1)]
    ):
        add("Conv2d", shape, stride, padding, dilation, mode)
    for mode, (stride, padding, dilation) in itertools.product(modes, [((1,), (1,), (1,)),
                                                                       ((2,), (2,), (2,))]):
        add("Conv1d", (4, 6, (3,), 1), stride, padding, dilation, mode)
    # Linear, depthwise convs (rejected by most methods) and padding='valid'.
    cases += [LayerCase("Linear", 6, 4), LayerCase("Linear", 3, 5, bias=False), LayerCase("Linear", 4, 4)]
    cases += [LayerCase("Conv2d", 4, 8, (3, 3), (1, 1), (1, 1), (1, 1), groups=4),
              LayerCase("Conv2d", 4, 4, (1, 1), (1, 1), (0, 0), (1, 1), groups=4, bias=False),
              LayerCase("Conv2d", 4, 6, (3, 3), (1, 1), "valid", (1, 1))]
    return cases


CASES = _cases()


def _check_exact(method_name: str, case: LayerCase) -> None:
    """Skip (with the method's reason) if rejected, else assert exactness in float64 and float32."""
    method = get_method(method_name)
    layer = case.build(torch.float64)
    reason = method.unsupported_reason(layer)
    if reason is not None:
        assert isinstance(reason, str) and reason, f"{method_name}: empty unsupported reason"
        assert not must_support(method_name, case), f"{method_name} must support {case}: {reason}"
        pytest.skip(reason)
    for dtype, tolerance in ((torch.float64, FLOAT64_TOLERANCE), (torch.float32, FLOAT32_TOLERANCE)):
        layer = case.build(dtype)
        module = factorize(method, layer, rank=1.0)
        assert module.rank == method.full_rank(layer)
        assert {p.dtype for p in module.parameters()} == {dtype}
        x = case.input(dtype)
        with torch.no_grad():
            out_error = relative_error(module(x), layer(x))
        weight_error = relative_error(module.dense_weight(), layer.weight)
        assert out_error <= tolerance, f"{dtype} output error {out_error:.2e}"
        assert weight_error <= tolerance, f"{dtype} dense_weight error {weight_error:.2e}"
        if layer.bias is None:
            assert module.dense_bias() is None
        else:
            assert torch.equal(module.dense_bias(), layer.bias.detach())


EVEN_SAME_WARNING = "ignore:Using padding='same' with even kernel lengths:UserWarning"


@pytest.mark.filterwarnings(EVEN_SAME_WARNING)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("method_name", METHODS)
def test_full_rank_is_exact(method_name: str, case: LayerCase) -> None:
    _check_exact(method_name, case)


def test_case_space_is_small_and_covers_the_standard() -> None:
    assert len(CASES) < 200  # per method: the suite grows by this many cases with each registered method
    assert any(c.kind == "Conv2d" and c.c_out < c.kernel_volume for c in CASES)
    assert {c.padding_mode for c in CASES} >= {"zeros", "reflect", "circular"}
    assert {c.bias for c in CASES} == {True, False}


@pytest.mark.parametrize("method_name", METHODS)
def test_every_method_accepts_some_layer(method_name: str) -> None:
    method = get_method(method_name)
    accepted = [c for c in CASES if method.unsupported_reason(c.build()) is None]
    assert accepted, f"{method_name} rejects every test layer"


# -- random configurations --------------------------------------------------------------------------
@st.composite
def random_cases(draw) -> LayerCase:
    kind = draw(st.sampled_from(["Conv1d", "Conv2d"]))
    dims = 1 if kind == "Conv1d" else 2

    def per_axis(values: list[int]) -> tuple[int, ...]:
        return tuple(draw(st.sampled_from(values)) for _ in range(dims))

    groups = draw(st.sampled_from([1, 1, 2, 3]))
    kernel, stride, dilation = per_axis([1, 2, 3]), per_axis([1, 2]), per_axis([1, 2])
    if all(s == 1 for s in stride) and draw(st.booleans()):
        padding: tuple[int, ...] | str = "same"
    else:
        padding = per_axis([0, 1, 2])
    return LayerCase(
        kind,
        groups * draw(st.integers(1, 4)),
        groups * draw(st.integers(1, 4)),
        kernel,
        stride,
        padding,
        dilation,
        groups,
        draw(st.booleans()),
        draw(st.sampled_from(["zeros", "zeros", "reflect", "circular", "replicate"])),
    )


@pytest.mark.filterwarnings(EVEN_SAME_WARNING)
@settings(max_examples=30, deadline=None)
@given(case=random_cases())
def test_random_configurations_are_exact(case: LayerCase) -> None:
    for method_name in METHODS:
        try:
            _check_exact(method_name, case)
        except pytest.skip.Exception:
            continue


# -- error versus rank ------------------------------------------------------------------------------
# Allowed increase of the relative weight error from one rank to the next. HOSVD, SVD and spatial SVD
# truncate nested subspaces, so their error cannot grow (1e-12 is rounding). CP-ALS is a local
# optimizer; cp chains its fits along a rank grid, each warm-started from the previous one, so its
# error does not grow along that grid either. Between grid ranks it may by ALS noise: the largest
# increase measured on SWEEP_CASES is below 3e-8, hence a slack of 1e-7.
MONOTONICITY_SLACK = {"cp": 1e-7}
SWEEP_CASES = [
    LayerCase("Conv2d", 6, 8, (3, 3), padding=(1, 1)),
    LayerCase("Conv2d", 8, 6, (3, 3), groups=2),
    LayerCase("Conv2d", 4, 5, (2, 3)),
    LayerCase("Conv1d", 5, 7, (3,)),
    LayerCase("Conv2d", 6, 9, (1, 1)),
    LayerCase("Linear", 7, 5),
]


@pytest.mark.parametrize("case", SWEEP_CASES, ids=str)
@pytest.mark.parametrize("method_name", METHODS)
def test_error_does_not_grow_with_rank(method_name: str, case: LayerCase) -> None:
    method = get_method(method_name)
    layer = case.build(torch.float64)
    reason = method.unsupported_reason(layer)
    if reason is not None:
        pytest.skip(reason)
    ranks = []
    for step in range(1, 21):
        rank = method.resolve_rank(layer, rank=step / 20)
        if rank not in ranks:
            ranks.append(rank)
    errors = [relative_error(method.decompose(layer, r).dense_weight(), layer.weight) for r in ranks]
    slack = MONOTONICITY_SLACK.get(method_name, 1e-12)
    for (low, e_low), (high, e_high) in zip(zip(ranks, errors), zip(ranks[1:], errors[1:])):
        assert e_high <= e_low + slack, f"error grows from rank {low} ({e_low:.3e}) to {high} ({e_high:.3e})"
    assert errors[-1] <= FLOAT64_TOLERANCE
    assert len(ranks) > 1 or ranks[0] == method.full_rank(layer)


# -- torch.fx and reloading -------------------------------------------------------------------------
FX_CASES = [
    LayerCase("Conv2d", 4, 6, (3, 3), (2, 1), (1, 2), (1, 1)),
    LayerCase("Conv2d", 4, 6, (3, 3), (1, 1), "same", (2, 2), groups=2, padding_mode="reflect"),
    LayerCase("Conv1d", 4, 6, (3,), (2,), (1,), (1,)),
    LayerCase("Conv2d", 6, 4, (1, 1), (2, 2), (1, 1), (1, 1)),
    LayerCase("Linear", 6, 4),
]


@pytest.mark.parametrize("case", FX_CASES, ids=str)
@pytest.mark.parametrize("method_name", METHODS)
def test_traces_with_fx_and_reloads(method_name: str, case: LayerCase) -> None:
    method = get_method(method_name)
    layer = case.build(torch.float32)
    reason = method.unsupported_reason(layer)
    if reason is not None:
        pytest.skip(reason)
    module = factorize(method, layer, rank=0.5)
    x = case.input(torch.float32)
    traced = fx.symbolic_trace(module)
    with torch.no_grad():
        eager = module(x)
        assert torch.equal(traced(x), eager)
        # A model that contains the factorized layer traces through it too.
        wrapper = fx.symbolic_trace(torch.nn.Sequential(module, torch.nn.ReLU()))
        assert torch.equal(wrapper(x), torch.relu(eager))
    # from_conv is the same factorization; build + load_state_dict is the reload path.
    assert torch.equal(type(module).from_conv(layer, rank=0.5).dense_weight(), module.dense_weight())
    reloaded = method.build(layer, module.rank)
    reloaded.load_state_dict(module.state_dict())
    with torch.no_grad():
        assert torch.equal(reloaded(x), eager)
