"""The course's other compressions on the shipped digits models: channel SVD, shift, kernel dictionary, per-kernel
SAL at two budgets each, and k-means weight sharing at 8/5/4/3 bits (``B:data``: weighted by the calibration data).

For each trained checkpoint (``convfactor.zoo``: ResNet-20 and the small MobileNet on 8x8 digits) and each
variant, one row: layers replaced, MACs and params (ratios to the BatchNorm-folded original), held-out
accuracy (450 images) without and with a short distillation (``convfactor.distill.finetune``, KL to the
original's logits on training images), the ONNX file size (for weight sharing: codebook + uint8 indices,
``convfactor.share_onnx``), the measured onnxruntime speedup (``convfactor.runtime.benchmarking``: batch 1, 1 thread,
interleaved, median ratio) and the challenge score (``convfactor.score``; the dictionary's zero codes
count as unstructured pruning p_u, weight sharing as q_w = the average index + codebook bits).

Every 3x3 conv but the first is factorized with calibration data (256 training images: data-aware fits),
except in the variants marked nodata. ``sal`` keeps m taps of every kernel slice: its zeros count as p_u.

``--real ppocr_rec`` (or another model of ``benchmarks/real``, installed as ``benchmarks/real_models.py``
says) runs the same variants on that pretrained network with its own calibration data and task metric,
every conv but the first taken (no fine-tune, no timing: the rows give the metric, MACs, params, zeros
and score).
Weight sharing runs on the BatchNorm-folded original, as ``factorize`` leaves a model: sharing the unfolded
one keeps more accuracy (at 4 bits, no fine-tune: 0.942 held-out against 0.887 folded), but both ONNX
exporters fold BatchNorm into the conv weights, which leaves nothing to pack. Its fine-tuned row moves
the centroids only (``convfactor.share.finetune_codebooks``), so the result still has K values per layer.

    python benchmarks/course_methods.py                          # both models (~15 min on 2 cores)
    python benchmarks/course_methods.py --models resnet20_digits --finetune-steps 0 --min-time 0.5
    python benchmarks/course_methods.py --real ppocr_rec --variants channel_svd:0.5,sal:2,sal:1 --bits 4,4:data
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/auto_budget.py

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import convfactor  # noqa: E402
from convfactor.auto import finetune  # noqa: E402
from convfactor.costs import count_params, count_zeros, module_macs  # noqa: E402
from convfactor.runtime.benchmarking import available_cores, benchmark, cpu_model  # noqa: E402
from convfactor.score import challenge_score  # noqa: E402
from convfactor.share import finetune_codebooks, share_weights, sharing_report  # noqa: E402
from convfactor.share_onnx import export_shared_onnx  # noqa: E402
from convfactor.zoo import evaluate_accuracy, load_pretrained  # noqa: E402
from convfactor.zoo.digits import calibration_subset, load_digits_split  # noqa: E402

MODELS = ("resnet20_digits", "mobilenet_digits")
# (method, rank spec) at two budgets each: rank fractions for channel_svd, taps m and atoms K as ints.
# "dictionary:4:nodata" fits from the weights alone, so its lasso code keeps its zeros (with data the code is
# refit densely).
VARIANTS = ("channel_svd:0.5", "channel_svd:0.25", "shift:3", "shift:2", "dictionary:4", "dictionary:2",
            "dictionary:4:nodata", "sal:2", "sal:1")
SHARE_BITS = ("8", "5", "4", "3", "4:data", "3:data")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--bits", default=",".join(map(str, SHARE_BITS)))
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--min-time", type=float, default=2.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--real", default=None, help="a model of benchmarks/real (e.g. ppocr_rec) instead of digits")
    parser.add_argument("--quick", action="store_true", help="--real: fewer evaluation and calibration inputs")
    return parser.parse_args(argv)


def distilled(student: nn.Module, teacher: nn.Module, train_x: torch.Tensor, args) -> nn.Module:
    student = copy.deepcopy(student)
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))
    batches = [(train_x[order[i:i + 64]],) for i in range(0, len(order) - 63, 64)]
    finetune(student, teacher, batches, steps=args.finetune_steps, lr=args.finetune_lr, progress=False)
    return student


def tuned_codebooks(shared: nn.Module, teacher: nn.Module, train_x: torch.Tensor, args) -> nn.Module:
    report, shared = sharing_report(shared), copy.deepcopy(shared)
    shared.convfactor_sharing = report  # a GraphModule's deepcopy drops it
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))
    batches = [(train_x[order[i:i + 64]],) for i in range(0, len(order) - 63, 64)]
    finetune_codebooks(shared, teacher, batches, steps=args.finetune_steps, lr=args.finetune_lr, progress=False)
    return shared


def zero_fraction(model: nn.Module) -> float:
    return count_zeros(model) / count_params(model)


def measure(label, model, reference, onnx_path, x, args, test, macs, params, score, finetuned_accuracy):
    return {
        "variant": label, "macs": macs, "params": params,
        "accuracy": evaluate_accuracy(model, *test), "accuracy_finetuned": finetuned_accuracy,
        "onnx_bytes": Path(onnx_path).stat().st_size,
        "speedup": benchmark(reference, str(onnx_path), x, threads=1, warmup=20, repeats=100,
                             min_time=args.min_time, progress=False).results[0].speedup,
        "score": score,
    }


def variant_policy(model: nn.Module, spec: str) -> tuple[dict, list[str]]:
    """The policy of a variant ``METHOD:RANK[:FLAGS]``: that method for every Conv2d but the first."""
    method, rank, *flags = spec.split(":")
    rank_value = float(rank) if "." in rank else int(rank)
    first_conv = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    return {"rules": [{"match": first_conv, "method": "skip"},
                      {"types": ["Conv2d"], "method": method, "rank": rank_value}]}, [method, rank, *flags]


def real_rows(args) -> list[dict]:
    """The variants and sharing rows on a pretrained network of ``benchmarks/real`` (its task metric)."""
    root = Path(__file__).resolve().parent.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.real.runs import load_spec

    spec = load_spec(args.real, args.quick)
    model = spec["build"]().eval()
    x = spec["example"]

    def factorize(policy: dict, **kwargs) -> nn.Module:
        try:
            return convfactor.factorize(model, policy, x, **spec["capture"], **kwargs)
        except convfactor.TraceError:
            if not spec.get("capture_fallback"):
                raise
            return convfactor.factorize(model, policy, x, **spec["capture_fallback"], **kwargs)

    folded = factorize({"rules": [{"match": "*", "method": "skip"}]})
    base_macs, base_params = module_macs(folded, x[0].shape), count_params(folded)
    key = spec["metric_key"]
    rows = [{"model": spec["name"], "variant": "original", "layers": "-", "macs": 1.0, "params": 1.0,
             "zeros": zero_fraction(folded),
             key: spec["metric"](folded)[key], "score": challenge_score(base_params, base_macs).score}]
    print(json.dumps(rows[-1]), flush=True)
    for variant in [v for v in args.variants.split(",") if v]:
        policy, (method, rank, *flags) = variant_policy(folded, variant)
        fast = factorize(policy, calibration=None if "nodata" in flags else spec["calibration"])
        report = convfactor.get_report(fast)
        p_u = zero_fraction(fast)
        rows.append({"model": spec["name"], "variant": " ".join([method, rank, *flags]),
                     "layers": f"{len(report.replaced)}/{len(report.layers)}", "macs": report.macs_after / base_macs,
                     "params": report.params_after / base_params, "zeros": p_u, key: spec["metric"](fast)[key],
                     "score": challenge_score(report.params_after, report.macs_after, unstructured_pruning=p_u).score})
        print(json.dumps(rows[-1]), flush=True)
    for entry in [b for b in args.bits.split(",") if b]:
        bits, _, data = entry.partition(":")
        shared = share_weights(folded, bits=int(bits), calibration=spec["calibration"] if data else None)
        sharing = sharing_report(shared)
        rows.append({"model": spec["name"], "variant": f"share {entry} (q_w {sharing.weight_bits():.2f})",
                     "layers": "all", "macs": 1.0, "params": 1.0, "zeros": zero_fraction(shared),
                     key: spec["metric"](shared)[key],
                     "score": sharing.score(base_macs).score})
        print(json.dumps(rows[-1]), flush=True)
    print()
    print(f"| variant | layers | MACs | params | zeros (p_u) | {key} | score |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['layers']} | {r['macs']:.3f} | {r['params']:.3f} | {r['zeros']:.3f} | "
              f"{r[key]:.4f} | {r['score']:.5f} |")
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.real:
        rows = real_rows(args)
        if args.json is not None:
            args.json.write_text(json.dumps(rows, indent=2))
        return 0
    test = load_digits_split("test")
    train_x, _ = load_digits_split("train")
    calib, _ = calibration_subset(args.calibration)
    x = test[0][:1]
    rows = []
    print(f"# machine: {cpu_model()}, {available_cores()} cores; onnxruntime CPU 1 thread", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model, _ = load_pretrained(name)
            model.eval()
            folded = convfactor.factorize(model, {"rules": [{"types": ["Conv2d", "Linear"], "method": "skip"}]}, x)
            base_macs, base_params = module_macs(folded, x.shape), count_params(folded)
            base_onnx = Path(tmp) / f"{name}.onnx"
            convfactor.export_onnx(folded, x, base_onnx, exporter="torchscript")
            base = measure("original", folded, str(base_onnx), base_onnx, x, args, test, 1.0, 1.0,
                           challenge_score(base_params, base_macs).score, None)
            rows.append({"model": name, **base})
            print(json.dumps(rows[-1]), flush=True)
            for spec in [v for v in args.variants.split(",") if v]:
                policy, (method, rank, *flags) = variant_policy(folded, spec)
                fast = convfactor.factorize(model, policy, x, calibration=None if "nodata" in flags else calib)
                report = convfactor.get_report(fast)
                path = Path(tmp) / f"{name}-{spec.replace(':', '-')}.onnx"
                convfactor.export_onnx(fast, x, path, exporter="torchscript")
                p_u = zero_fraction(fast)
                score = challenge_score(report.params_after, report.macs_after, unstructured_pruning=p_u).score
                tuned = None
                if args.finetune_steps > 0:
                    tuned = evaluate_accuracy(distilled(fast, model, train_x, args), *test)
                row = measure(" ".join([method, rank, *flags]), fast, str(base_onnx), path, x, args, test,
                              report.macs_after / base_macs, report.params_after / base_params, score, tuned)
                row.update(model=name, layers=f"{len(report.replaced)}/{len(report.layers)}", zeros=p_u)
                rows.append(row)
                print(json.dumps(row), flush=True)
            for entry in [b for b in args.bits.split(",") if b]:
                bits, _, data = entry.partition(":")
                shared = share_weights(folded, bits=int(bits), calibration=calib if data else None)
                path = Path(tmp) / f"{name}-share{bits}{data}.onnx"
                export_shared_onnx(shared, x, path, exporter="torchscript")
                score = sharing_report(shared).score(base_macs).score
                tuned = None
                if args.finetune_steps > 0:
                    tuned = evaluate_accuracy(tuned_codebooks(shared, model, train_x, args), *test)
                label = f"share {bits} bits{' data' if data else ''}"
                row = measure(label, shared, str(base_onnx), path, x, args, test, 1.0, 1.0, score, tuned)
                row.update(model=name, layers="all", weight_bits=sharing_report(shared).weight_bits())
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print("| model | variant | layers | MACs | params | acc. (no FT) | acc. (FT) | ONNX KB | ORT speedup | score |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tuned = "-" if r["accuracy_finetuned"] is None else f"{r['accuracy_finetuned']:.3f}"
        print(f"| {r['model']} | {r['variant']} | {r.get('layers', '-')} | {r['macs']:.3f} | {r['params']:.3f} | "
              f"{r['accuracy']:.3f} | {tuned} | {r['onnx_bytes'] / 1024:.0f} | {r['speedup']:.2f}x | "
              f"{r['score']:.5f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
