"""One benchmark row, run inside its own process: factorize a real network, measure the result.

``run_row`` is what a worker process executes; ``benchmarks/real_models.py`` starts one worker per
row so that each row's peak memory is its own (``os.wait4``) and a row that runs too long can be
stopped without losing the others.
"""
from __future__ import annotations

import importlib
import resource
import time
import traceback

import torch

import convfactor
from convfactor.errors import ConvfactorError

MODELS = {"crepe": "crepe", "ppocr_rec": "ppocr", "ppocr_det": "ppocr_det", "craft": "craft"}
AUTO = [{"match": "*", "method": "auto"}]
ROWS = ("original", "auto_macs_0.5", "auto_macs_0.25", "auto_latency_0.8",
        "uniform_weight_0.5", "uniform_data_0.5", "uniform_weight_0.25", "uniform_data_0.25",
        "fidelity_macs_0.5", "fidelity_latency_0.8")
UNIFORM_METHOD = "spatial_svd"


def load_spec(model: str, quick: bool) -> dict:
    module = importlib.import_module(f"benchmarks.real.{MODELS[model]}")
    return module.spec(quick=quick)


def row_plan(row: str, spec: dict, model, max_rel_error: float) -> dict:
    """Policy and factorize keyword arguments of ``row`` (all rows but 'original' use calibration
    except the weight-only uniform baseline)."""
    kind, _, value = row.rpartition("_")
    fraction = float(value) if value else None
    cal = {"calibration": spec["calibration"]}
    if row.startswith("auto_macs"):
        return {"policy": {"target": {"macs": fraction}, "rules": AUTO}, "kwargs": cal}
    if row.startswith("auto_latency"):
        return {"policy": {"target": {"latency": fraction}, "rules": AUTO},
                "kwargs": {**cal, "latency": {"threads": 1}}}
    if row.startswith("fidelity_"):
        target = {"macs": fraction} if "macs" in row else {"latency": fraction}
        kwargs = {**cal, "latency": {"threads": 1}} if "latency" in row else cal
        return {"policy": {"target": target, "fidelity": {"max_rel_error": max_rel_error},
                           "rules": AUTO}, "kwargs": kwargs}
    if row.startswith("uniform_"):
        from .uniform import fraction_for_macs, uniform_policy

        rank, predicted = fraction_for_macs(model, spec["example"], UNIFORM_METHOD, fraction)
        kwargs = cal if row.startswith("uniform_data") else {}
        return {"policy": uniform_policy(UNIFORM_METHOD, rank), "kwargs": kwargs,
                "note": f"{UNIFORM_METHOD} rank {rank:.3f} of full (MACs {predicted:.3f} predicted)"}
    raise ValueError(f"unknown row {row!r}; choose from {', '.join(ROWS)}")


def _factorize(model, plan: dict, spec: dict) -> tuple:
    """factorize as a user first would; on a capture failure, retry with the fix the error names
    and say so (``spec['capture_fallback']``)."""
    try:
        return convfactor.factorize(model, plan["policy"], spec["example"], **spec["capture"],
                                    progress="lines", **plan["kwargs"]), None
    except convfactor.TraceError as exc:
        fallback = spec.get("capture_fallback")
        if not fallback:
            raise
        note = f"capture failed ({str(exc)[:120]}...); retried with {fallback}"
        return convfactor.factorize(model, plan["policy"], spec["example"], **fallback,
                                    progress="lines", **plan["kwargs"]), note


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rel_error(reference: torch.Tensor, output: torch.Tensor) -> float:
    return float((output - reference).norm() / reference.norm().clamp_min(1e-12))


def run_row(model_name: str, row: str, quick: bool, max_rel_error: float = 0.1) -> dict:
    """Everything measured for one row, as plain data."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = load_spec(model_name, quick)
    model = spec["build"]()
    out = {"model": model_name, "row": row, "metric_key": spec["metric_key"],
           "metric_desc": spec["metric_desc"], "domain": spec["domain"], "source": spec["source"],
           "params": sum(p.numel() for p in model.parameters()), "notes": []}
    if row == "original":
        out.update(metric=spec["metric"](model), mac_ratio=1.0, speedup=1.0, rel_error=0.0)
        from convfactor.costs import per_layer_macs

        out["macs"] = sum(per_layer_macs(model, spec["example"]).values())
        out["peak_rss_mb"] = _peak_rss_mb()
        return out

    plan = row_plan(row, spec, model, max_rel_error)
    out["policy"] = plan["policy"]
    if plan.get("note"):
        out["notes"].append(plan["note"])
    out["rss_before_mb"] = _peak_rss_mb()
    start = time.perf_counter()
    try:
        fast, note = _factorize(model, plan, spec)
    except ConvfactorError as exc:
        out.update(error=f"{type(exc).__name__}: {exc}", factorize_s=time.perf_counter() - start,
                   peak_rss_mb=_peak_rss_mb())
        return out
    out["factorize_s"] = time.perf_counter() - start
    out["peak_rss_mb"] = _peak_rss_mb()
    if note:
        out["notes"].append(note)
    report = convfactor.get_report(fast)
    out["mac_ratio"] = report.macs_after / report.macs_before if report.macs_before else None
    out["param_ratio"] = report.params_after / report.params_before
    out["report_notes"] = list(report.notes)
    out["report_warnings"] = list(getattr(report, "warnings", []))
    out["fidelity_check"] = report.extra.get("fidelity_check")
    out["methods"] = _method_counts(report)
    auto = report.extra.get("auto") or {}
    out["auto_info"] = {k: v for k, v in auto.items() if isinstance(v, (str, int, float, bool, list))
                        and len(str(v)) < 2000}
    out["metric"] = spec["metric"](fast)
    probe = spec["calibration"][:16]
    with torch.no_grad():
        out["rel_error"] = _rel_error(model(probe), fast(probe))
    out.update(_speedup(model, fast, spec))
    return out


def _method_counts(report) -> dict:
    counts: dict[str, int] = {}
    for layer in report.layers:
        key = layer.method or "kept"
        counts[key] = counts.get(key, 0) + 1
    return counts


def _speedup(model, fast, spec: dict) -> dict:
    """Measured onnxruntime speedup, 1 thread, interleaved pairs, median of per-pair ratios."""
    try:
        bench = convfactor.benchmark(model, fast, spec["example"], threads=1, progress=False,
                                     warmup=3, repeats=15, min_time=2.0)
    except Exception as exc:  # an export failure is a finding to report, not a reason to stop
        return {"speedup": None, "speedup_error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    result = bench.results[0]
    return {"speedup": result.speedup, "speedup_p10": result.speedup_p10,
            "speedup_p90": result.speedup_p90, "pairs": result.pairs,
            "original_ms": result.original.median_ms, "factorized_ms": result.factorized.median_ms,
            "exporters": {k: v.get("exporter") for k, v in bench.to_dict().get("models", {}).items()}}


def worker_main(model_name: str, row: str, quick: bool, max_rel_error: float, path: str) -> int:
    import json

    try:
        result = run_row(model_name, row, quick, max_rel_error)
    except Exception as exc:  # a crash in convfactor is a finding: keep its traceback
        result = {"model": model_name, "row": row, "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()[-4000:]}
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    return 0
