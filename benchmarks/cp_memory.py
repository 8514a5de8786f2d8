"""Time and peak memory of CP-ALS (convfactor.methods.cp) on a 512x512x3x3 conv weight, and of TensorLy's.

``--solver tensorly`` runs TensorLy's ``parafac`` (PyTorch backend, SVD initialization, the same sweep
budget and tolerance as convfactor's cold fit) on the same weight, for the comparison in the README;
TensorLy is not a dependency of convfactor (``pip install tensorly`` to run it).

Each rank runs in a fresh subprocess so that its peak resident memory (ru_maxrss) is its own; the
reported peak is the increase over the process after the weight was created. CPU time is reported
beside wall time because a loaded machine stretches wall time.

Usage:
    python benchmarks/cp_memory.py [--channels 512] [--ranks 256 512 1024] [--threads 1] [--solver tensorly]
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
    from convfactor.methods.cp import DEFAULT_MAX_SWEEPS, DEFAULT_TOLERANCE, cp_factors
    channels, rank, solver = int(sys.argv[1]), int(sys.argv[2]), sys.argv[4]
    w = torch.randn(channels, channels, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if solver == "tensorly":
        import warnings
        import tensorly
        from tensorly.decomposition import parafac
        tensorly.set_backend("pytorch")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall, cpu = time.perf_counter(), time.process_time()
    if solver == "tensorly":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "n_eigenvecs larger than min(matrix.shape)" for the kernel modes
            cp, errors = parafac(w, rank, n_iter_max=DEFAULT_MAX_SWEEPS, init="svd", tol=DEFAULT_TOLERANCE,
                                 return_errors=True)
        error = float(((w - tensorly.cp_to_tensor(cp)) ** 2).sum() / (w**2).sum())
        result = type("Fit", (), {"sweeps": len(errors), "source": "tensorly", "relative_squared_error": error})
    else:
        result = cp_factors(w, rank)
    print(json.dumps({"solver": solver,
        "channels": channels, "rank": rank, "threads": torch.get_num_threads(),
        "wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2),
        "peak_delta_mib": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, 1),
        "sweeps": result.sweeps, "source": result.source,
        "relative_squared_error": result.relative_squared_error,
    }))
""")


def measure(channels: int, rank: int, threads: int, solver: str = "convfactor") -> dict:
    """Run one decomposition in a subprocess and return its measurements.

    Args:
        channels: C_in = C_out of the 3x3 weight.
        rank: CP rank R.
        threads: torch intra-op threads in the subprocess.
        solver: 'convfactor' (``cp_factors``: the rank chain) or 'tensorly' (cold ``parafac``).
    Returns:
        dict with wall_s, cpu_s, peak_delta_mib, sweeps, source and relative_squared_error.
    """
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(channels), str(rank), str(threads), solver],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--ranks", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--solver", choices=("convfactor", "tensorly"), default="convfactor")
    args = parser.parse_args(argv)
    print(f"{'solver':>10} {'C':>5} {'R':>5} {'thr':>3} {'wall s':>7} {'cpu s':>7} {'peak MiB':>9} {'sweeps':>6} "
          f"{'rel err^2':>9}")
    for rank in args.ranks:
        m = measure(args.channels, rank, args.threads, args.solver)
        print(f"{m['solver']:>10} {m['channels']:>5} {m['rank']:>5} {m['threads']:>3} {m['wall_s']:>7.2f} "
              f"{m['cpu_s']:>7.2f} {m['peak_delta_mib']:>9.1f} {m['sweeps']:>6} {m['relative_squared_error']:>9.3g}",
              flush=True)


if __name__ == "__main__":
    main()
