"""Tests of convfactor.distill: fine-tuning and held-out distillation."""
