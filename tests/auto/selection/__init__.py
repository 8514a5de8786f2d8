"""Tests of convfactor.auto.selection."""
