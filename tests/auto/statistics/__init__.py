"""Tests of convfactor.auto.statistics."""
