"""Tests of convfactor.auto.fits."""
