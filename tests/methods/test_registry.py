"""The built-in methods are all registered, and a missing method module is an import error, not a gap."""

import importlib
import sys

import pytest

import convfactor
import convfactor.methods

SIX = {"spatial_svd", "tucker2", "cp", "depthwise", "grouped", "svd"}


def test_all_six_methods_are_registered():
    assert SIX <= set(convfactor.available_methods())
    assert SIX <= set(convfactor.methods.BUILTIN_METHODS)
    for name in SIX:
        assert convfactor.get_method(name).name == name


def test_a_missing_method_module_fails_the_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "convfactor.methods.cp", None)  # as if cp.py were missing
    try:
        with pytest.raises(ImportError, match="convfactor.methods.cp"):
            importlib.reload(convfactor.methods)
    finally:
        monkeypatch.undo()
        importlib.reload(convfactor.methods)
    assert SIX <= set(convfactor.available_methods())
