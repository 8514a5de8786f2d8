"""Tests of convfactor.auto.latency."""
