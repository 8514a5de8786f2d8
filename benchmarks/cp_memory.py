"""Time and peak memory of CP-ALS (convfactor.methods.cp) on a 512x512x3x3 conv weight.

Each rank runs in a fresh subprocess so that its peak resident memory (ru_maxrss) is its own; the
reported peak is the increase over the process after the weight was created. CPU time is reported
beside wall time because a loaded machine stretches wall time.

Usage:
    python benchmarks/cp_memory.py [--channels 512] [--ranks 256 512 1024] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

__all__ = ["measure", "main"]

_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    torch.set_num_threads(int(sys.argv[3]))
    from convfactor.methods.cp import cp_factors
    channels, rank = int(sys.argv[1]), int(sys.argv[2])
    w = torch.randn(channels, channels, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall, cpu = time.perf_counter(), time.process_time()
    result = cp_factors(w, rank)
    print(json.dumps({
        "channels": channels, "rank": rank, "threads": torch.get_num_threads(),
        "wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2),
        "peak_delta_mib": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, 1),
        "sweeps": result.sweeps, "source": result.source,
        "relative_squared_error": round(result.relative_squared_error, 4),
    }))
""")


def measure(channels: int, rank: int, threads: int) -> dict:
    """Run one decomposition in a subprocess and return its measurements.

    Args:
        channels: C_in = C_out of the 3x3 weight.
        rank: CP rank R.
        threads: torch intra-op threads in the subprocess.
    Returns:
        dict with wall_s, cpu_s, peak_delta_mib, sweeps, source and relative_squared_error.
    """
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(channels), str(rank), str(threads)],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--ranks", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    print(f"{'C':>5} {'R':>5} {'thr':>3} {'wall s':>7} {'cpu s':>7} {'peak MiB':>9} {'sweeps':>6} {'rel err^2':>9}")
    for rank in args.ranks:
        m = measure(args.channels, rank, args.threads)
        print(f"{m['channels']:>5} {m['rank']:>5} {m['threads']:>3} {m['wall_s']:>7.2f} {m['cpu_s']:>7.2f} "
              f"{m['peak_delta_mib']:>9.1f} {m['sweeps']:>6} {m['relative_squared_error']:>9.4f}", flush=True)


if __name__ == "__main__":
    main()
