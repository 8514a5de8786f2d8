"""Seconds to score one layer's rank grid in the output norm, per method and statistic form (the candidates phase).

For each layer shape and patch-covariance form, ``convfactor.auto.selection.scoring.error_function`` is set up
and evaluated at every rank of the method's default grid (``rank_grid`` over ``FRACTION_GRID``; at most
``SCORED_RANKS`` spread over the grid for reduced statistics, as ``_score`` evaluates them), the median of
``--repeats`` runs. Shapes: the 256- and 512-channel 3x3 convs of ResNet-18's last stages and a 512 -> 1024
one like CRAFT's ``basenet.slice5.1``; the full statistic where ``statistic_forms`` keeps it (D <= 2304 in
1 GiB), Kronecker for the rest. The covariances are random SPD (timing does not depend on their values).
Run it at two commits to compare them (``git worktree add /tmp/old <commit>``, then
``PYTHONPATH=/tmp/old python benchmarks/candidate_errors.py``), one run after the other on a quiet machine.

    python benchmarks/candidate_errors.py                      # ~2 min
    python benchmarks/candidate_errors.py --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from types import SimpleNamespace

import torch
from torch import nn

import convfactor
from convfactor.auto.options import AutoOptions
from convfactor.auto.selection.candidates import FRACTION_GRID, rank_grid
from convfactor.auto.selection.plans import LayerPlan
from convfactor.auto.selection.scoring import SCORED_RANKS, error_function
from convfactor.auto.statistics.covariance import FullCovariance, KroneckerCovariance
from convfactor.methods import get_method

CASES = ((256, 256, "full"), (512, 512, "kronecker"), (512, 1024, "kronecker"))
METHODS = ("spatial_svd", "tucker2", "depthwise")


def _covariance(channels: int, form: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    if form == "full":
        x = torch.randn(1, channels * 9, channels * 9 + 64, generator=g, dtype=torch.float64)
        return FullCovariance(x @ x.transpose(1, 2) / x.shape[2])
    a = torch.randn(1, channels, channels + 8, generator=g, dtype=torch.float64)
    b = torch.randn(1, 9, 20, generator=g, dtype=torch.float64)
    return KroneckerCovariance(a @ a.transpose(1, 2), b @ b.transpose(1, 2))


def _score_grid(layer: nn.Module, method: str, sigma) -> int:
    plan = LayerPlan("conv", layer, 0, None)
    ranks = rank_grid(get_method(method), layer, FRACTION_GRID)
    if sigma.kind != "full" and len(ranks) > SCORED_RANKS:
        ranks = [ranks[round(i * (len(ranks) - 1) / (SCORED_RANKS - 1))] for i in range(SCORED_RANKS)]
    error2 = error_function(plan, get_method(method), {"conv": SimpleNamespace(covariance=sigma)}, {}, AutoOptions())
    for rank in ranks:
        error2(rank)
    return len(ranks)


def _commit() -> str:
    """The commit of the convfactor that is imported (``PYTHONPATH`` may point at another checkout)."""
    source = os.path.dirname(os.path.dirname(os.path.abspath(convfactor.__file__)))
    head = subprocess.run(["git", "-C", source, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", source, "status", "--porcelain", "--untracked-files=no", "--", "convfactor"],
                           capture_output=True, text=True)
    return (head.stdout.strip() or "(not a git checkout)") + ("+changes" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"convfactor {_commit()}; {args.threads} torch threads; median of {args.repeats}")
    print(f"{'layer':<16} {'statistic':<10} {'method':<12} {'ranks':>5} {'seconds':>8}")
    for c_in, c_out, form in CASES:
        torch.manual_seed(0)
        layer = nn.Conv2d(c_in, c_out, 3, padding=1)
        sigma = _covariance(c_in, form, seed=c_in + c_out)
        for method in METHODS:
            times, count = [], 0
            for _ in range(args.repeats):
                start = time.perf_counter()
                count = _score_grid(layer, method, sigma)
                times.append(time.perf_counter() - start)
            print(f"{f'{c_in}->{c_out} 3x3':<16} {form:<10} {method:<12} {count:>5} {statistics.median(times):>8.2f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
