"""Rank arithmetic (convfactor/ranks.py) and FactorizationMethod.resolve_rank."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from convfactor.errors import ConvfactorError, RankError
from convfactor.methods import FactorizationMethod, available_methods, get_method
from convfactor.ranks import (
    align_rank,
    check_rank,
    fraction_to_rank,
    is_fraction,
    kept_energy,
    rank_from_json,
    rank_text,
    rank_to_json,
    smallest_rank_for_energy,
)

from .conftest import LayerCase


# -- ranks.py ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fraction", "full", "expected"),
    [(0.5, 64, 32), (0.3, 10, 3), (0.31, 10, 4), (0.01, 10, 1), (1.0, 7, 7), (1 / 3, 9, 3), (0.999, 5, 5)],
)
def test_fraction_to_rank_is_the_ceiling(fraction: float, full: int, expected: int) -> None:
    assert fraction_to_rank(fraction, full) == expected


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5, math.nan])
def test_fraction_out_of_range_is_rejected(fraction: float) -> None:
    with pytest.raises(RankError, match=r"\(0, 1\]"):
        fraction_to_rank(fraction, 10)


@settings(max_examples=40, deadline=None)
@given(st.floats(0.001, 1.0), st.floats(0.001, 1.0), st.integers(1, 600))
def test_fraction_to_rank_is_monotone_and_in_range(a: float, b: float, full: int) -> None:
    low, high = sorted((a, b))
    assert 1 <= fraction_to_rank(low, full) <= fraction_to_rank(high, full) <= full
    assert fraction_to_rank(high, full) >= high * full - 1e-6


def test_check_rank_accepts_ints_in_range() -> None:
    assert check_rank(1, 5, "r", "m") == 1
    assert check_rank(np.int64(5), 5, "r", "m") == 5
    assert type(check_rank(np.int64(5), 5, "r", "m")) is int


@pytest.mark.parametrize(("value", "message"), [
    (0, r"^spatial_svd: r=0 is out of range \[1, 5\]"),
    (6, r"^spatial_svd: r=6 is out of range \[1, 5\]"),
    (-1, r"^spatial_svd: r=-1 is out of range"),
    (True, r"^spatial_svd: r must be an int, got True"),
    (2.0, r"^spatial_svd: r must be an int, got 2.0"),
    ("2", r"^spatial_svd: r must be an int, got '2'"),
])
def test_check_rank_names_method_component_and_range(value: object, message: str) -> None:
    with pytest.raises(RankError, match=message):
        check_rank(value, 5, "r", "spatial_svd")


def test_kept_energy() -> None:
    s = [3.0, 2.0, 1.0]  # squares 9, 4, 1 of 14
    assert kept_energy(s, 1) == pytest.approx(9 / 14, rel=1e-15)
    assert kept_energy(s, 3) == 1.0
    assert kept_energy([0.0, 0.0], 1) == 1.0


@pytest.mark.parametrize(("energy", "expected"), [
    (0.5, 1), (9 / 14, 1), (9 / 14 + 1e-6, 2), (13 / 14, 2), (0.95, 3), (1.0, 3),
])
def test_smallest_rank_for_energy(energy: float, expected: int) -> None:
    assert smallest_rank_for_energy([3.0, 2.0, 1.0], energy) == expected
    assert smallest_rank_for_energy([1.0, 3.0, 2.0], energy) == expected  # order does not matter


def test_energy_one_stops_at_the_numerical_rank() -> None:
    assert smallest_rank_for_energy([2.0, 1.0, 1e-9, 0.0], 1.0) == 2
    assert smallest_rank_for_energy([0.0, 0.0], 1.0) == 1


@pytest.mark.parametrize("energy", [0.0, -0.1, 1.01])
def test_energy_out_of_range_is_rejected(energy: float) -> None:
    with pytest.raises(RankError, match=r"energy must be in \(0, 1\]"):
        smallest_rank_for_energy([1.0], energy)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.0, 10.0), min_size=1, max_size=12), st.floats(0.01, 1.0))
def test_smallest_rank_for_energy_is_smallest(values: list[float], energy: float) -> None:
    s = np.sort(np.asarray(values))[::-1]
    r = smallest_rank_for_energy(s, energy)
    assert 1 <= r <= len(s)
    assert kept_energy(s, r) >= energy - 1e-9
    if r > 1:
        assert kept_energy(s, r - 1) < energy


@pytest.mark.parametrize(("rank", "multiple", "full", "expected"), [
    (17, 16, 64, 32), (16, 16, 64, 16), (17, 16, 20, 20), (5, None, 64, 5), (5, 1, 64, 5), (5, 0, 64, 5),
    (1, 8, 3, 3),
])
def test_align_rank(rank: int, multiple: int | None, full: int, expected: int) -> None:
    assert align_rank(rank, multiple, full) == expected


def test_is_fraction() -> None:
    assert is_fraction(0.5) and is_fraction(1.0) and is_fraction(np.float64(0.5))
    assert not is_fraction(1) and not is_fraction(True) and not is_fraction((1, 2))


# -- resolve_rank -----------------------------------------------------------------------------------
CONV = LayerCase("Conv2d", 4, 6, (3, 3), padding=(1, 1))  # spatial_svd full 12, tucker2 full (4, 6)


@pytest.fixture
def conv() -> nn.Module:
    return CONV.build()


@pytest.mark.parametrize(("spec", "expected"), [
    (None, 12), (1.0, 12), (0.5, 6), (0.01, 1), (5, 5), ((5,), 5), ([7], 7), (np.int64(3), 3),
])
def test_resolve_single_component(conv: nn.Module, spec: object, expected: int) -> None:
    assert get_method("spatial_svd").resolve_rank(conv, rank=spec) == expected


@pytest.mark.parametrize(("spec", "expected"), [
    (None, (4, 6)), (1.0, (4, 6)), (0.5, (2, 3)), (0.1, (1, 1)), (3, (3, 3)), (5, (4, 5)), (100, (4, 6)),
    ((2, 5), (2, 5)), ([4, 1], (4, 1)),
])
def test_resolve_two_components(conv: nn.Module, spec: object, expected: tuple[int, int]) -> None:
    assert get_method("tucker2").resolve_rank(conv, rank=spec) == expected


@pytest.mark.parametrize(("method", "spec", "message"), [
    ("spatial_svd", 13, r"^spatial_svd: r=13 is out of range \[1, 12\]"),
    ("spatial_svd", 0, r"^spatial_svd: r=0 is out of range \[1, 12\]"),
    ("spatial_svd", (1, 2), r"^spatial_svd: rank needs 1 value\(s\) \(r\), got \[1, 2\]"),
    ("spatial_svd", True, r"^spatial_svd: r must be an int"),
    ("spatial_svd", "half", r"^spatial_svd: r must be an int, got 'half'"),
    ("spatial_svd", 1.5, r"^spatial_svd: a fractional rank must be in \(0, 1\], got 1.5"),
    ("spatial_svd", 0.0, r"^spatial_svd: a fractional rank must be in \(0, 1\]"),
    ("tucker2", (5, 2), r"^tucker2: r_in=5 is out of range \[1, 4\]"),
    ("tucker2", (2, 7), r"^tucker2: r_out=7 is out of range \[1, 6\]"),
    ("tucker2", (2, 0.5), r"^tucker2: r_out must be an int"),
    ("tucker2", 0, r"^tucker2: r_in=0 is out of range \[1, 4\]"),
    ("tucker2", -2, r"^tucker2: r_in=-2 is out of range"),
    ("tucker2", (3,), r"^tucker2: rank needs 2 value\(s\) \(r_in, r_out\), got \[3\]"),
    ("tucker2", -0.5, r"^tucker2: a fractional rank must be in \(0, 1\]"),
])
def test_out_of_range_names_method_and_component(conv: nn.Module, method: str, spec: object,
                                                 message: str) -> None:
    with pytest.raises(RankError, match=message) as raised:
        get_method(method).resolve_rank(conv, rank=spec)
    assert isinstance(raised.value, ConvfactorError)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("energy", [0.0, 1.5, -1.0, True, "all"])
@pytest.mark.parametrize("method", ["spatial_svd", "tucker2"])
def test_energy_out_of_range_names_method(conv: nn.Module, method: str, energy: object) -> None:
    with pytest.raises(RankError, match=rf"^{method}: energy must be in \(0, 1\]"):
        get_method(method).resolve_rank(conv, energy=energy)


def test_rank_and_energy_are_exclusive(conv: nn.Module) -> None:
    with pytest.raises(RankError, match=r"^spatial_svd: give either rank or energy, not both"):
        get_method("spatial_svd").resolve_rank(conv, rank=3, energy=0.9)


def test_energy_resolves_per_component_and_grows_with_energy(conv: nn.Module) -> None:
    spatial, tucker = get_method("spatial_svd"), get_method("tucker2")
    assert spatial.resolve_rank(conv, energy=1.0) == 12  # random weights have full numerical rank
    assert tucker.resolve_rank(conv, energy=1.0) == (4, 6)
    previous_spatial, previous_tucker = 0, (0, 0)
    for energy in (0.2, 0.5, 0.8, 0.95, 0.99):
        r = spatial.resolve_rank(conv, energy=energy)
        r_in, r_out = tucker.resolve_rank(conv, energy=energy)
        assert r >= previous_spatial and r_in >= previous_tucker[0] and r_out >= previous_tucker[1]
        previous_spatial, previous_tucker = r, (r_in, r_out)
    assert previous_spatial < 12  # some energy targets do truncate


def test_energy_matches_the_spectrum(conv: nn.Module) -> None:
    # spatial_svd's spectrum: singular values of W as (C_in*k_h, C_out*k_w).
    w = conv.weight.detach().numpy()
    matrix = w.transpose(1, 2, 0, 3).reshape(4 * 3, 6 * 3)
    s = np.linalg.svd(matrix, compute_uv=False)
    for energy in (0.3, 0.6, 0.9):
        assert get_method("spatial_svd").resolve_rank(conv, energy=energy) == smallest_rank_for_energy(s, energy)


@pytest.mark.parametrize(("method", "spec", "align", "expected"), [
    ("spatial_svd", 5, 8, 8),
    ("spatial_svd", 9, 8, 12),  # capped at the full rank
    ("spatial_svd", 8, 8, 8),
    ("spatial_svd", 0.25, 4, 4),
    ("tucker2", (1, 5), 4, (4, 6)),
    ("tucker2", (1, 2), 2, (2, 2)),
    ("tucker2", 0.5, 4, (4, 4)),
])
def test_align_rounds_each_component_up(conv: nn.Module, method: str, spec: object, align: int,
                                        expected: object) -> None:
    assert get_method(method).resolve_rank(conv, rank=spec, align=align) == expected


def test_align_applies_to_energy(conv: nn.Module) -> None:
    method = get_method("spatial_svd")
    plain = method.resolve_rank(conv, energy=0.5)
    assert method.resolve_rank(conv, energy=0.5, align=4) == min(12, math.ceil(plain / 4) * 4)


class _NoSpectrum(FactorizationMethod):
    """A method without a spectrum and with a divisibility rule (not registered)."""

    name = "no_spectrum"
    summary = "test double"
    rank_meaning = "an even number of channels"

    def unsupported_reason(self, layer):
        return None

    def full_rank(self, layer):
        return 8

    def validate_rank(self, layer, rank):
        if rank[0] % 2:
            raise RankError(f"{self.name}: rank must be even, got {rank[0]}")
        return rank

    def decompose(self, layer, rank):
        raise NotImplementedError

    def build(self, layer, rank):
        raise NotImplementedError


def test_energy_needs_a_spectrum(conv: nn.Module) -> None:
    with pytest.raises(RankError, match=r"^no_spectrum has no singular-value spectrum"):
        _NoSpectrum().resolve_rank(conv, energy=0.5)


def test_validate_rank_runs_after_alignment(conv: nn.Module) -> None:
    method = _NoSpectrum()
    assert method.resolve_rank(conv, rank=4) == 4
    assert method.resolve_rank(conv, rank=3, align=2) == 4
    with pytest.raises(RankError, match="must be even, got 3"):
        method.resolve_rank(conv, rank=3)


def test_resolved_ranks_are_plain_json_values(conv: nn.Module) -> None:
    r = get_method("spatial_svd").resolve_rank(conv, rank=np.int64(3))
    r_pair = get_method("tucker2").resolve_rank(conv, rank=[np.int64(2), 3])
    assert type(r) is int and type(r_pair) is tuple and all(type(x) is int for x in r_pair)


def test_a_float32_layer_resolves_like_float64() -> None:
    layer32, layer64 = CONV.build(torch.float32), CONV.build(torch.float64)
    for energy in (0.5, 0.9):
        assert (get_method("tucker2").resolve_rank(layer32, energy=energy)
                == get_method("tucker2").resolve_rank(layer64, energy=energy))


# -- every registered method ------------------------------------------------------------------------
def _accepted_layer(method: FactorizationMethod) -> nn.Module:
    for case in (CONV, LayerCase("Conv2d", 6, 4, (1, 1)), LayerCase("Linear", 6, 4)):
        layer = case.build()
        if method.unsupported_reason(layer) is None:
            return layer
    raise AssertionError(f"{method.name} accepts none of the test layers")


@pytest.mark.parametrize("method_name", available_methods())
@pytest.mark.parametrize(("spec", "what"), [
    ({"rank": 1.5}, "fractional rank"), ({"rank": -0.5}, "fractional rank"), ({"rank": 0}, "=0 is out of range"),
    ({"rank": 10**6}, "out of range"), ({"energy": 0.0}, "energy"), ({"energy": 2.0}, "energy"),
    ({"rank": 0.5, "energy": 0.5}, "either rank or energy"),
], ids=["fraction>1", "fraction<0", "rank=0", "rank=huge", "energy=0", "energy>1", "rank+energy"])
def test_every_method_names_itself_in_rank_errors(method_name: str, spec: dict, what: str) -> None:
    method = get_method(method_name)
    layer = _accepted_layer(method)
    if spec == {"rank": 10**6} and method_name == "tucker2":
        spec = {"rank": (10**6, 1)}  # an int is capped per mode for tucker2
    with pytest.raises(RankError) as raised:
        method.resolve_rank(layer, **spec)
    message = str(raised.value)
    assert message.startswith(f"{method_name}: ") and what in message and "\n" not in message
    if "out of range" in what:
        assert any(f"{name}=" in message for name in method.rank_component_names()), message


@pytest.mark.parametrize("method_name", available_methods())
def test_every_method_resolves_full_and_fractional_ranks(method_name: str) -> None:
    method = get_method(method_name)
    layer = _accepted_layer(method)
    full = method.full_rank(layer)
    assert method.resolve_rank(layer) == full
    assert method.resolve_rank(layer, rank=1.0) == full
    assert method.resolve_rank(layer, rank=full) == full


@pytest.mark.parametrize(("rank", "text", "as_json"), [(8, "8", 8), ((8, 16), "8x16", [8, 16]),
                                                       (None, "-", None), (0.5, "0.5", 0.5)])
def test_rank_text_and_json(rank, text, as_json):
    assert rank_text(rank) == text
    assert rank_to_json(rank) == as_json
    if isinstance(rank, (int, tuple)):
        assert rank_from_json(json.loads(json.dumps(rank_to_json(rank)))) == rank
