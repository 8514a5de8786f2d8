"""The public API: every exported name resolves, and a name that moved says where it lives now."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import convfactor

PACKAGES = ["convfactor", "convfactor.runtime", "convfactor.auto", "convfactor.share", "convfactor.score",
            "convfactor.share_onnx"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_resolves(package):
    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if getattr(module, name, None) is None]
    assert missing == []
    assert len(module.__all__) == len(set(module.__all__))  # no name listed twice


def test_the_top_level_is_the_core():
    assert set(convfactor.__all__) == {
        "__version__", "factorize", "get_report", "inspect_model", "FactorizeReport", "LayerDecision",
        "Policy", "Rule", "Fidelity", "Metric", "available_methods", "get_method",
        "load", "save_factorized", "apply_plan", "export_onnx", "ExportResult",
        "ConvfactorError", "PolicyError", "RankError", "TraceError", "FidelityWarning", "SpeedWarning",
        "sweep",
    }


@pytest.mark.parametrize(("name", "home"), [
    ("check_fidelity", "convfactor.runtime"), ("benchmark", "convfactor.runtime"),
    ("quantize_onnx", "convfactor.runtime"), ("profile_layers", "convfactor.runtime"),
    ("BenchmarkReport", "convfactor.runtime"), ("AutoOptions", "convfactor.auto"),
    ("finetune", "convfactor.auto"), ("resolve_policy", "convfactor.auto"),
    ("share_weights", "convfactor.share"), ("export_shared_onnx", "convfactor.share_onnx"),
    ("challenge_score", "convfactor.score"),
])
def test_a_moved_name_says_where_it_lives(name, home):
    with pytest.raises(AttributeError) as info:
        getattr(convfactor, name)
    message = str(info.value)
    assert "\n" not in message and f"{home}.{name}" in message, message
    assert getattr(importlib.import_module(home), name) is not None  # and it is there


def test_an_unknown_name_is_a_plain_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'nothing_like_it'"):
        convfactor.nothing_like_it  # noqa: B018


def test_a_sub_package_is_reachable_from_the_top_level():
    code = ("import convfactor; print(convfactor.runtime.benchmark.__module__, "
            "convfactor.score.challenge_score.__name__, convfactor.auto.AutoOptions.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["convfactor.runtime.benchmarking", "challenge_score", "AutoOptions"]
