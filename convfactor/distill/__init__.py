"""Training the factorized network towards the original's outputs: fine-tuning and held-out distillation.

    finetune       ``finetune``: a short distillation of a result on calibration data
    training       ``DistillOptions`` and ``distill_model``: stopped and judged on held-out data
    criterion      ``Criterion``: what judges a state (the metric on its select set, else the select error)
    result         ``factorize(..., distill=...)``'s step: run it, record it in the report

Not part of resolving a policy: it runs after one. May import the core, ``convfactor.batches`` and
``convfactor.output_checker``; never ``convfactor.auto`` (which re-exports ``finetune`` and ``DistillOptions``).
"""

from .finetune import FinetuneResult, finetune
from .training import DistillOptions

__all__ = ["finetune", "FinetuneResult", "DistillOptions"]
