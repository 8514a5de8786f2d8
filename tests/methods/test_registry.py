"""The built-in methods are all registered, and a missing method module is an import error, not a gap."""

import importlib
import sys

import pytest

import convfactor
import convfactor.methods

SIX = {"spatial_svd", "tucker2", "cp", "depthwise", "grouped", "svd"}
TEN = SIX | {"channel_svd", "shift", "dictionary", "sal"}


def test_every_builtin_method_is_listed_and_registered():
    assert set(convfactor.methods.BUILTIN_METHODS) == TEN
    assert TEN <= set(convfactor.available_methods())
    for name in TEN:
        method = convfactor.get_method(name)
        assert method.name == name
        assert type(method).__module__ == f"convfactor.methods.{name}"
    shipped = {name for name in convfactor.available_methods()
               if type(convfactor.get_method(name)).__module__.startswith("convfactor.methods.")}
    assert shipped == TEN  # no method module outside the list


def test_a_missing_method_module_fails_the_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "convfactor.methods.cp", None)  # as if cp.py were missing
    try:
        with pytest.raises(ImportError, match="convfactor.methods.cp"):
            importlib.reload(convfactor.methods)
    finally:
        monkeypatch.undo()
        importlib.reload(convfactor.methods)
    assert SIX <= set(convfactor.available_methods())
