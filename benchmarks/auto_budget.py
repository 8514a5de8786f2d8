"""Budget allocation + data-aware factorization against a uniform-rank weight SVD, on trained digits models.

For the shipped digits checkpoints (ResNet-20 and the small MobileNet, ``convfactor.zoo``) and each target
(MACs 0.5, 0.33, 0.25; latency 0.5) it compares

  * auto: ``{"rules": [{"types": ["Conv2d"], "method": "auto"}], "target": {...}}`` with calibration data
    (256 class-balanced training images): methods and ranks allocated per layer, data-aware factors;
  * auto, align 16: the same with ``align: 16`` in the rule (ranks in multiples of 16, the channel blocks
    of onnxruntime's fast CPU conv path), or ``align: 8`` where 16 cannot reach the budget; MAC targets
    only (the latency model tries x16 ranks itself);
  * auto+fidelity: auto with calibration data and a policy fidelity bound (``--fidelity``);
  * nocal / nocal + fidelity: ``method: auto`` without calibration data (weight-only selection), without
    and with a policy fidelity bound (``--fidelity``, measured on ``--fidelity-images`` training images
    given as the example inputs): the bound buys back accuracy by spending more MACs, and says so;
  * uniform: every conv as spatial_svd at one rank fraction, the largest that meets the same MAC budget
    (found by bisection), factorized from the weights alone (for the latency row: the MACs auto reached).

and two controls that separate what each mechanism buys:

  * uniform + data: the uniform rank fraction above (same MACs), factorized data-aware from the same
    calibration images (whitened factors, sequential refit): what calibration data buys without allocation;
  * auto weight-only: the auto row without calibration data (weight-error selection and factors): what
    allocation buys without data.

Reported per row: MACs and params of the result (ratios to the original), held-out accuracy (450
images, ``convfactor.zoo.digits``) without fine-tuning and after a short distillation
(``convfactor.distill.finetune``, training images, labels unused), and the measured onnxruntime speedup
(``convfactor.runtime.benchmarking``: batch 1, 1 thread, original and factorized interleaved, median ratio).

    python benchmarks/auto_budget.py                          # everything (~30-60 min on 2 cores)
    python benchmarks/auto_budget.py --models resnet20_digits --targets macs:0.5 --finetune-steps 0
    python benchmarks/auto_budget.py --checkpoints /tmp/ckpt  # checkpoints from examples/train_digits.py
    python benchmarks/auto_budget.py --models resnet20_digits --targets macs:0.5 --variants nocal,nocal+fidelity \
        --finetune-steps 0                                    # the fidelity floor without calibration data
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (see examples/train_digits.py): spinning threads starve
# each other on a busy 2-core machine. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import convfactor  # noqa: E402
from convfactor.auto import finetune  # noqa: E402
from convfactor.runtime.benchmarking import available_cores, benchmark, cpu_model  # noqa: E402
from convfactor.zoo import evaluate_accuracy, load_pretrained  # noqa: E402
from convfactor.zoo.digits import calibration_subset, load_digits_split  # noqa: E402

MODELS = ("resnet20_digits", "mobilenet_digits")
TARGETS = ("macs:0.5", "macs:0.33", "macs:0.25", "latency:0.5")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="checkpoints, comma-separated")
    parser.add_argument("--targets", default=",".join(TARGETS), help="KIND:FRACTION, comma-separated")
    parser.add_argument("--checkpoints", type=Path, default=None, help="checkpoint directory (default: shipped)")
    parser.add_argument("--variants", default="auto,auto16,uniform,uniform_data,auto_weight",
                        help="auto, auto16, uniform, uniform_data, auto_weight, auto+fidelity, nocal, "
                             "nocal+fidelity (comma-separated)")
    parser.add_argument("--fidelity", type=float, default=0.1, help="max_rel_error of the nocal+fidelity bound")
    parser.add_argument("--fidelity-images", type=int, default=64,
                        help="training images the nocal variants get as example inputs (the fidelity data)")
    parser.add_argument("--calibration", type=int, default=256, help="calibration images (training split)")
    parser.add_argument("--finetune-steps", type=int, default=150, help="distillation steps (0: skip)")
    parser.add_argument("--finetune-lr", type=float, default=5e-4, help="distillation Adam learning rate")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds of timed pairs per speedup")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (onnxruntime timing uses 1)")
    parser.add_argument("--latency-cache", type=Path, default=None, help="latency cache (default: ~/.cache)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    return parser.parse_args(argv)


def uniform_policy(fraction: float) -> dict:
    return {"rules": [{"types": ["Conv2d"], "method": "spatial_svd", "rank": fraction}]}


def uniform_for_macs(model: nn.Module, x: torch.Tensor, macs_ratio: float) -> tuple[float, nn.Module]:
    """The largest uniform spatial-SVD rank fraction whose factorized model has MACs ratio <= macs_ratio."""
    low, high, best = 1e-3, 1.0, None
    for _ in range(18):  # ranks are integers: 18 halvings pin the fraction far below one rank step
        middle = (low + high) / 2
        candidate = convfactor.factorize(model, uniform_policy(middle), x)
        if convfactor.get_report(candidate).macs_ratio <= macs_ratio:
            low, best = middle, candidate
        else:
            high = middle
    if best is None:
        best = convfactor.factorize(model, uniform_policy(low), x)
    return low, best


def speedup(original: nn.Module, factorized: nn.Module, x: torch.Tensor, min_time: float) -> tuple[float, bool]:
    """The median per-pair speedup, and whether its spread was narrow enough to mean something."""
    report = benchmark(original, factorized, x, threads=1, warmup=20, repeats=100, min_time=min_time,
                       progress=False, exporter="torchscript")
    return report.results[0].speedup, report.results[0].reliable


def finetuned_accuracy(model: nn.Module, teacher: nn.Module, args, train_x, test) -> float | None:
    if args.finetune_steps <= 0:
        return None
    student = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train_x), generator=generator)
    batches = [(train_x[order[i:i + 64]],) for i in range(0, len(order) - 63, 64)]
    finetune(student, teacher, batches, steps=args.finetune_steps, lr=args.finetune_lr, progress=False)
    return evaluate_accuracy(student, *test)


def row(name, target, method, model, teacher, factorized, x, args, train_x, test, seconds, note=""):
    report = convfactor.get_report(factorized)
    return {
        "model": name, "target": target, "method": method,
        "macs_ratio": report.macs_ratio, "params_ratio": report.params_ratio,
        "accuracy": evaluate_accuracy(factorized, *test),
        "accuracy_finetuned": finetuned_accuracy(factorized, teacher, args, train_x, test),
        **dict(zip(("speedup", "speedup_reliable"), speedup(model, factorized, x, args.min_time))),
        "layers": f"{len(report.replaced)}/{len(report.layers)}",
        "output_error": (report.extra.get("fidelity_check") or {}).get("rel_error"),
        "warnings": report.warnings,
        "seconds": seconds, "note": note,
    }


def fmt(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict], baselines: dict[str, dict]) -> str:
    lines = [
        "| model | target | method | MACs | params | layers | out. err | acc. (no FT) | acc. (FT) | ORT speedup "
        "| resolve s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, base in baselines.items():
        lines.append(f"| {name} | - | original | 1.000 | 1.000 | - | 0 | {fmt(base['accuracy'])} | - | 1.00x | - |")
    for r in rows:
        noisy = "" if r["speedup_reliable"] else " (noisy)"
        lines.append(f"| {r['model']} | {r['target']} | {r['method']} | {fmt(r['macs_ratio'])} | "
                     f"{fmt(r['params_ratio'])} | {r['layers']} | {fmt(r.get('output_error'))} | "
                     f"{fmt(r['accuracy'])} | "
                     f"{fmt(r['accuracy_finetuned'])} | {r['speedup']:.2f}x{noisy} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def machine() -> str:
    import onnxruntime

    return (f"{cpu_model()}, {available_cores()} of {os.cpu_count()} cores usable; Python {platform.python_version()}, "
            f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__} (CPU, 1 thread, batch 1, "
            "graph optimization all, TorchScript export)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    test = load_digits_split("test")
    train_x, _ = load_digits_split("train")
    calib, _ = calibration_subset(args.calibration)
    x = test[0][:1]
    latency = {"threads": 1} if args.latency_cache is None else {"threads": 1, "cache": str(args.latency_cache)}
    rows, baselines = [], {}
    print(f"machine: {machine()}", flush=True)
    for name in args.models.split(","):
        model, meta = load_pretrained(name, directory=args.checkpoints)
        baselines[name] = {"accuracy": evaluate_accuracy(model, *test)}
        print(f"{name}: held-out accuracy {baselines[name]['accuracy']:.4f}", flush=True)
        for spec in args.targets.split(","):
            kind, _, value = spec.partition(":")
            fraction = float(value)
            variants = args.variants.split(",")
            macs_budget = fraction if kind == "macs" else None
            for variant in ("auto", "auto16"):
                if variant not in variants or (variant == "auto16" and kind != "macs"):
                    continue
                started = time.perf_counter()
                # align 16 cannot reach tight budgets on 16-channel layers (r >= 16): then try align 8.
                for align in ((16, 8) if variant == "auto16" else (None,)):
                    rule = {"types": ["Conv2d"], "method": "auto", **({"align": align} if align else {})}
                    try:
                        auto = convfactor.factorize(model, {"rules": [rule], "target": {kind: fraction}}, x,
                                                    calibration=calib, latency=latency)
                        break
                    except convfactor.PolicyError as unreachable:
                        print(f"{name} {spec} align {align}: {unreachable}", flush=True)
                else:
                    continue
                seconds = time.perf_counter() - started
                label = "auto + data" + (f", align {align}" if align else "")
                result = row(name, spec, label, model, model, auto, x, args, train_x, test, seconds)
                rows.append(result)
                macs_budget = macs_budget if macs_budget is not None else result["macs_ratio"]
                print(json.dumps(result), flush=True)
            for variant in ("nocal", "nocal+fidelity", "auto+fidelity"):
                if variant not in variants:
                    continue
                policy = {"rules": [{"types": ["Conv2d"], "method": "auto"}], "target": {kind: fraction}}
                if variant.endswith("+fidelity"):
                    policy["fidelity"] = {"max_rel_error": args.fidelity}
                calibrated = variant.startswith("auto")
                example = x if calibrated else train_x[:args.fidelity_images]
                started = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fast = convfactor.factorize(model, policy, example, latency=latency,
                                                calibration=calib if calibrated else None)
                seconds = time.perf_counter() - started
                label = ("auto + data" if calibrated else "auto, no calibration") + (
                    f", fidelity {args.fidelity}" if "fidelity" in variant else "")
                result = row(name, spec, label, model, model, fast, x, args, train_x, test, seconds)
                rows.append(result)
                print(json.dumps(result), flush=True)
            if "auto_weight" in variants:
                started = time.perf_counter()
                rule = {"types": ["Conv2d"], "method": "auto"}
                try:
                    auto = convfactor.factorize(model, {"rules": [rule], "target": {kind: fraction}}, x,
                                                latency=latency)
                    result = row(name, spec, "auto, weight-only (no data)", model, model, auto, x, args, train_x,
                                 test, time.perf_counter() - started)
                    rows.append(result)
                    macs_budget = macs_budget if macs_budget is not None else result["macs_ratio"]
                    print(json.dumps(result), flush=True)
                except convfactor.PolicyError as unreachable:
                    print(f"{name} {spec} weight-only: {unreachable}", flush=True)
            if {"uniform", "uniform_data"} & set(variants) and macs_budget is not None:
                started = time.perf_counter()
                uniform_fraction, uniform = uniform_for_macs(model, x, macs_budget)
                seconds = time.perf_counter() - started
                if "uniform" in variants:
                    label = f"uniform spatial_svd r={uniform_fraction:.3f}"
                    result = row(name, spec, label, model, model, uniform, x, args, train_x, test, seconds)
                    rows.append(result)
                    print(json.dumps(result), flush=True)
                if "uniform_data" in variants:
                    started = time.perf_counter()
                    aware = convfactor.factorize(model, uniform_policy(uniform_fraction), x, calibration=calib)
                    label = f"uniform spatial_svd r={uniform_fraction:.3f} + data"
                    result = row(name, spec, label, model, model, aware, x, args, train_x, test,
                                 seconds + time.perf_counter() - started)
                    rows.append(result)
                    print(json.dumps(result), flush=True)
    print()
    print(f"machine: {machine()}")
    print(f"fine-tuning: {args.finetune_steps} Adam steps, lr {args.finetune_lr}, batch 64, KL to the original's "
          f"logits on training images; calibration: {args.calibration} training images")
    print()
    print(markdown(rows, baselines))
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows, "baselines": baselines}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
