"""A MACs then a latency resolution of CREPE full sharing one ``SharedWork``: each kind's scoring seconds.

A sweep's latency point scores its own candidates (costed by measured time), but since the candidates'
errors are kept across kinds (``convfactor.auto.selection.error_memo``) it fits only ranks the MACs point
did not. This prints, per kind, the seconds of candidate scoring (``build_options``: costs, fits, probe
modules) and of the sensitivity probes, each resolution's wall time and allocation hash, and the shared
work's counts. Run it at two commits one after the other (a worktree on ``PYTHONPATH``) to compare::

    PYTHONPATH=<checkout> python benchmarks/error_memo_kinds.py [--threads 2] [--json out.json]

Layer timings come from the latency model's on-disk cache when an earlier run filled it (a cold cache
adds the timings to the latency kind's scoring).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--samples", type=int, default=128, help="calibration frames (default 128)")
    parser.add_argument("--json", help="append the record to this JSON-lines file")
    args = parser.parse_args(argv)

    import torch

    import convfactor
    import convfactor.auto.phases as phases
    from benchmarks.auto_scale import load_crepe, tones
    from convfactor.auto.shared import SharedWork

    torch.set_num_threads(args.threads)
    spent: list[tuple[str, str, float]] = []

    def timed(name, real, kind_at):
        def wrapper(*a, **k):
            started = time.perf_counter()
            out = real(*a, **k)
            spent.append((name, a[kind_at], round(time.perf_counter() - started, 2)))
            return out
        return wrapper

    phases.build_options = timed("candidates", phases.build_options, 1)  # (plans, kind, ...)
    phases.measure_sensitivities = timed("sensitivities", phases.measure_sensitivities, 2)  # (root, plans, kind)
    model, example, calibration = load_crepe(), tones(1, seed=1), tones(args.samples)
    work, runs = SharedWork(), {}
    for kind, fraction in (("macs", 0.5), ("latency", 0.8)):
        started = time.perf_counter()
        out = convfactor.factorize(model, {"rules": [{"method": "auto"}], "target": {kind: fraction}}, example,
                                   calibration=calibration, concrete_args={"embed": False}, shared=work)
        report = convfactor.get_report(out)
        resolved = json.dumps(report.policy.get("resolved"), sort_keys=True, default=str).encode()
        runs[kind] = {"wall_s": round(time.perf_counter() - started, 1),
                      "macs": report.macs_after / report.macs_before,
                      "allocation": hashlib.sha256(resolved).hexdigest()[:12],
                      # the measured search's own seconds (fidelity checks, whole-model timings, builds)
                      "search_checks": (report.extra.get("auto", {}).get("search") or {}).get("checks")}
    record = {"spent": spent, "runs": runs, "counts": dict(work.counts), "threads": args.threads,
              "load": os.getloadavg()[0]}
    print("phase          kind      seconds")
    for name, kind, seconds in spent:
        print(f"{name:14s} {kind:9s} {seconds:7.2f}")
    for kind, run in runs.items():
        print(f"{kind}: {run['wall_s']} s, MACs {run['macs']:.4f}, allocation {run['allocation']}, "
              f"search {run['search_checks']}")
    print(f"shared work computed: {dict(work.counts)}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
