"""Seconds of one layer's sequential-refit statistics: the D x D cross moment against it read through W.

``paired_statistics`` sums E[p_w p_w^T] and the cross moment E[p_w p_r^T] of a layer's patches in the work
and the original network; ``corrected_weight`` reads the cross only as W cross^T. With ``weight=W`` (full
form, 2 O < D) it sums (W p_r) p_w^T instead: 2 O D products per row, not D^2. Each row below times both on
the same random inputs (a 0.1 shift between the two networks), interleaved, median of ``--repeats``,
the paired moments and ``corrected_weight`` together, at the torch threads of ``CONVFACTOR_BENCH_THREADS``
(default 2). ResNet-18's 3x3 convs at 224x224 input, 128 samples (16384 rows at most, as ``AutoOptions``).

    python benchmarks/refit_moments.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

from convfactor.auto.fits.data_aware import corrected_weight, grouped_weight
from convfactor.auto.options import AutoOptions
from convfactor.auto.statistics.paired import paired_statistics

LAYERS = ((512, 512, 7), (256, 256, 14), (128, 128, 28))  # (in, out, side) of ResNet-18's stages 4, 3, 2


def seconds(layer: nn.Conv2d, reference: list, work: list, project: bool) -> float:
    weight = grouped_weight(layer.weight, 1)
    batches = [(x,) for x in reference]
    start = time.perf_counter()
    sigma, cross = paired_statistics(layer, "layer", batches, lambda _n, i, _b: reference[i],
                                     lambda _n, i, _b: work[i], AutoOptions().max_rows,
                                     weight=weight if project else None)
    corrected_weight(weight, sigma, cross, AutoOptions().damping)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=128)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("CONVFACTOR_BENCH_THREADS", "2")))
    root = Path(__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"commit {commit}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    print("| layer | rows | D x D cross s | through W s | ratio |\n|---|---:|---:|---:|---:|")
    for cin, cout, side in LAYERS:
        layer = nn.Conv2d(cin, cout, 3, padding=1)
        generator = torch.Generator().manual_seed(0)
        reference = [torch.randn(16, cin, side, side, generator=generator) for _ in range(args.samples // 16)]
        work = [x + 0.1 * torch.randn(x.shape, generator=generator) for x in reference]
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for project in (False, True):
                times[project].append(seconds(layer, reference, work, project))
        plain, projected = statistics.median(times[False]), statistics.median(times[True])
        rows = min(AutoOptions().max_rows, args.samples * side * side)
        print(f"| {cin} -> {cout} 3x3 @ {side}x{side} | {rows} | {plain:.2f} | {projected:.2f} | "
              f"{plain / projected:.2f}x |")
    print(f"load after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
