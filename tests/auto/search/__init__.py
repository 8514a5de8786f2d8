"""Tests of convfactor.auto.search."""
