"""The challenge score formula, checked against hand-computed values."""

import pytest

from convfactor.errors import ConvfactorError
from convfactor.score import challenge_score


def test_half_precision_reference_scores_two():
    s = challenge_score(5_600_000, 280_000_000, weight_bits=16, activation_bits=16)
    assert s.score == pytest.approx(1.0, rel=1e-12)  # (16/32)*1 + (16/32)*1
    s = challenge_score(11_200_000, 560_000_000, weight_bits=16, activation_bits=16)
    assert s.score == pytest.approx(2.0, rel=1e-12)


def test_full_formula_by_hand():
    s = challenge_score(1_000_000, 50_000_000, weight_bits=8, activation_bits=16,
                        structured_pruning=0.2, unstructured_pruning=0.1)
    params_term = (1 - 0.3) * (8 / 32) * 1_000_000 / 5.6e6
    macs_term = (1 - 0.2) * (16 / 32) * 50_000_000 / 2.8e8
    assert s.params_term == pytest.approx(params_term, rel=1e-12)
    assert s.macs_term == pytest.approx(macs_term, rel=1e-12)
    assert s.score == pytest.approx(params_term + macs_term, rel=1e-12)


def test_defaults_are_32_bit_unpruned():
    s = challenge_score(5_600_000, 280_000_000)
    assert s.score == pytest.approx(2.0, rel=1e-12)
    assert (s.weight_bits, s.activation_bits, s.structured_pruning) == (32, 32, 0.0)


@pytest.mark.parametrize("kwargs", [{"weight_bits": 0}, {"activation_bits": 33}, {"structured_pruning": 1.0},
                                    {"structured_pruning": 0.6, "unstructured_pruning": 0.5}])
def test_invalid_options(kwargs):
    with pytest.raises(ConvfactorError):
        challenge_score(1, 1, **kwargs)
