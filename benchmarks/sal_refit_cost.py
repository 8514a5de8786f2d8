"""Time and memory of sal's data-aware refit on one wide layer (``convfactor.auto.fits.taps``).

The refit solves one (m*C_in x m*C_in) least-squares system per output channel. This script builds a
C -> C 3x3 conv, a full (or Kronecker) input covariance from seeded, correlated random patches, and times
``layer_factorizer("sal", ...).factors(m)`` once, in one thread. Peak memory is the growth of the
process's resident set over the call (Linux: the high-water mark ``VmHWM`` is reset to the current
``VmRSS`` just before it, so the set-up's own peak does not hide the call's); ``tracemalloc`` sees only
Python's own allocator, not torch's tensors, and its peak is printed beside it to show that. ``--save`` / ``--compare``
keep the refit weight in a file to check that two versions of the code agree.

    python benchmarks/sal_refit_cost.py --channels 512 --m 2             # one 512 -> 512 3x3 layer
    python benchmarks/sal_refit_cost.py --channels 512 --m 2 --form kronecker
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import tracemalloc
from pathlib import Path

import torch
from torch import nn

from convfactor.auto.fits.registry import layer_factorizer
from convfactor.auto.statistics.covariance import FullCovariance, KroneckerCovariance


def covariance(form: str, channels: int, taps: int, seed: int):
    """A seeded covariance with correlated channels and taps (well away from the identity)."""
    g = torch.Generator().manual_seed(seed)
    if form == "kronecker":
        a = torch.randn(channels, 2 * channels, dtype=torch.float64, generator=g)
        b = torch.randn(taps, 2 * taps, dtype=torch.float64, generator=g)
        return KroneckerCovariance((a @ a.T / channels)[None], (b @ b.T / taps)[None])
    d = channels * taps
    mixing = torch.randn(d, d, dtype=torch.float64, generator=g) / d**0.5 + torch.eye(d, dtype=torch.float64)
    return FullCovariance((mixing @ mixing.T)[None])


def _status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--m", type=int, default=2)
    parser.add_argument("--form", choices=("full", "kronecker"), default="full")
    parser.add_argument("--save", type=Path, help="write the refit weight here (torch.save)")
    parser.add_argument("--compare", type=Path, help="a weight saved by --save: print the relative difference")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layer = nn.Conv2d(args.channels, args.channels, 3, padding=1).double()
    sigma = covariance(args.form, args.channels, 9, seed=0)
    factorizer = layer_factorizer("sal", layer, sigma)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    rss_before = _status_kib("VmRSS")
    tracemalloc.start()
    cpu, wall = time.process_time(), time.perf_counter()
    (weight,), _ = factorizer.factors(args.m)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    row = {"channels": args.channels, "m": args.m, "form": args.form, "wall_s": round(wall, 2),
           "cpu_s": round(cpu, 2), "peak_rss_growth_mib": round((_status_kib("VmHWM") - rss_before) / 1024, 1),
           "tracemalloc_peak_mib": round(traced_peak / 2**20, 2),
           "covariance_mib": round(sigma.nbytes / 2**20, 1)}
    if args.save:
        torch.save(weight, args.save)
    if args.compare:
        reference = torch.load(args.compare)
        row["relative_difference"] = float((weight - reference).norm() / reference.norm())
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
