"""One benchmark row, run inside its own process: factorize a real network, measure the result.

``run_row`` is what a worker process executes; ``benchmarks/real_models.py`` starts one worker per
row so that each row's peak memory is its own (``os.wait4``) and a row that runs too long can be
stopped without losing the others.
"""
from __future__ import annotations

import importlib
import os
import resource
import time
import traceback

import torch

import convfactor
from convfactor.errors import ConvfactorError

# name -> module under benchmarks/real (its ``spec``), or "module:function" for another spec builder.
MODELS = {"crepe": "crepe", "ppocr_rec": "ppocr", "ppocr_det": "ppocr_det", "craft": "craft",
          # multi-head and stateful networks (issue 18)
          "mtcnn_pnet": "mtcnn:spec_pnet", "mtcnn_onet": "mtcnn:spec_onet", "nudenet": "nudenet",
          "silero_vad": "silero_vad", "crepe_tiny": "crepe:spec_tiny"}
HEADS_MODELS = ("mtcnn_pnet", "mtcnn_onet", "nudenet", "silero_vad", "crepe_tiny")
AUTO = [{"match": "*", "method": "auto"}]
ROWS = ("original", "auto_macs_0.5", "auto_macs_0.25", "auto_latency_0.8",
        "uniform_weight_0.5", "uniform_data_0.5", "uniform_weight_0.25", "uniform_data_0.25",
        "fidelity_macs_0.5", "fidelity_macs_0.25", "fidelity_latency_0.8",
        "metric_macs_0.5", "metric_macs_0.25", "metric_latency_0.8")
HEADS_ROWS = ("original", "auto_macs_0.5", "auto_macs_0.25", "auto_latency_0.8",
              "fidelity_macs_0.5", "fidelity_macs_0.25", "fidelity_latency_0.8",
              "metric_macs_0.5", "metric_macs_0.25", "metric_latency_0.8")
UNIFORM_METHOD = "spatial_svd"


def load_spec(model: str, quick: bool) -> dict:
    module, _, function = MODELS[model].partition(":")
    return getattr(importlib.import_module(f"benchmarks.real.{module}"), function or "spec")(quick=quick)


def row_plan(row: str, spec: dict, model, max_rel_error: float, validation: bool = False) -> dict:
    """Policy and factorize keyword arguments of ``row`` (all rows but 'original' use calibration
    except the weight-only uniform baseline).

    ``fidelity_*`` rows give the bound ``{max_rel_error: ...}``; ``metric_*`` rows give the task metric
    (``metric=``, the spec's metric as one float, higher is better) and the bound
    ``{max_metric_drop: spec['tolerance']}``. ``validation``: also pass the spec's separate held-out
    inputs as ``validation=`` (rows with calibration only).
    """
    kind, _, value = row.rpartition("_")
    fraction = float(value) if value else None
    cal = {"calibration": spec["calibration"]}
    if validation and spec.get("validation") is not None:
        cal["validation"] = spec["validation"]
    if row.startswith(("fidelity_", "metric_", "auto_")):
        target = {"macs": fraction} if "_macs_" in row else {"latency": fraction}
        kwargs = {**cal, "latency": {"threads": 1}} if "_latency_" in row else dict(cal)
        policy = {"target": target, "rules": AUTO}
        if row.startswith("fidelity_"):
            policy["fidelity"] = {"max_rel_error": max_rel_error}
        elif row.startswith("metric_"):
            policy["fidelity"] = {"max_metric_drop": spec["tolerance"]}
            kwargs["metric"] = task_metric(spec)
        return {"policy": policy, "kwargs": kwargs}
    if row.startswith("uniform_"):
        from .uniform import fraction_for_macs, uniform_policy

        rank, predicted = fraction_for_macs(model, spec["example"], UNIFORM_METHOD, fraction)
        kwargs = cal if row.startswith("uniform_data") else {}
        return {"policy": uniform_policy(UNIFORM_METHOD, rank), "kwargs": kwargs,
                "note": f"{UNIFORM_METHOD} rank {rank:.3f} of full (MACs {predicted:.3f} predicted)"}
    raise ValueError(f"unknown row {row!r}; choose from {', '.join(ROWS)}")


def task_metric(spec: dict):
    """The spec's task metric as ``factorize(metric=...)`` takes it: a model -> one float, higher is
    better (a lower-is-better metric is negated)."""
    key, sign = spec["metric_key"], 1.0 if spec["higher_is_better"] else -1.0

    def metric(model) -> float:
        return sign * float(spec["metric"](model)[key])

    metric.__name__ = f"{spec['name']}_{key}"
    return metric


def missing_api(plan: dict) -> str | None:
    """Why this convfactor cannot run ``plan`` (a keyword ``factorize`` does not take), else None."""
    import inspect

    params = inspect.signature(convfactor.factorize).parameters
    missing = [k for k in plan["kwargs"] if k not in params]
    if missing:
        return f"convfactor.factorize takes no {', '.join(m + '=' for m in missing)} at this commit"
    return None


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


def _batches(data, size: int = 64) -> list[tuple]:
    """Inputs as a list of input tuples: a tensor is cut into batches, a list of batches kept."""
    if isinstance(data, torch.Tensor):
        return [(t,) for t in data.split(size)]
    if isinstance(data, tuple):
        return [data]
    return [b if isinstance(b, tuple) else (b,) for b in data]


def _leaves(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _leaves(o)]


def output_errors(model, fast, data, spec: dict, limit: int = 256) -> dict:
    """Relative L2 error of ``fast`` against ``model`` on ``data``: pooled over all outputs (as
    convfactor's check computed it before issue 18), per output, and per named slice of an output
    (``spec['outputs']['slices']``: {output: {axis, name: [start, stop]}})."""
    names = (spec.get("outputs") or {}).get("names")
    slices = (spec.get("outputs") or {}).get("slices", {})
    refs: list[list[torch.Tensor]] = []
    outs: list[list[torch.Tensor]] = []
    seen = 0
    with torch.no_grad():
        for batch in _batches(data):
            refs.append([t.double() for t in _leaves(model(*batch))])
            outs.append([t.double() for t in _leaves(fast(*batch))])
            seen += len(batch[0])
            if seen >= limit:
                break
    count = len(refs[0])
    names = names if names and len(names) == count else [f"output{i}" for i in range(count)]
    ref = [torch.cat([r[i] for r in refs]) for i in range(count)]
    out = [torch.cat([o[i] for o in outs]) for i in range(count)]
    diff2 = sum(float((o - r).pow(2).sum()) for o, r in zip(out, ref))
    norm2 = sum(float(r.pow(2).sum()) for r in ref)
    result = {"samples": seen, "pooled": (diff2 / max(norm2, 1e-300)) ** 0.5,
              "per_output": {n: _rel_error(r, o) for n, r, o in zip(names, ref, out)}}
    per_slice = {}
    for name, r, o in zip(names, ref, out):
        for part, span in {k: v for k, v in slices.get(name, {}).items() if k != "axis"}.items():
            axis = slices[name]["axis"]
            per_slice[f"{name}[{part}]"] = _rel_error(r.narrow(axis, span[0], span[1] - span[0]),
                                                      o.narrow(axis, span[0], span[1] - span[0]))
    if per_slice:
        result["per_slice"] = per_slice
    return result


_SPEED_WORDS = ("speed", "slower", "faster", "latency", "timed")
_ACCURACY_WORDS = ("far from", "output error", "agreement", "metric", "accuracy", "not kept", "overfit",
                   "held-out", "held out", "bound")


def accuracy_warnings(warned: list[dict]) -> list[dict]:
    """The warnings that speak of accuracy: a ``FidelityWarning`` that is no speed note (before issue 18
    speed notes came as ``FidelityWarning`` too: "measured 0.85x the original layer's speed"), or a
    warning of another category that names accuracy."""
    out = []
    for w in warned:
        category, text = w["category"], w["message"].lower()
        if category == "SpeedWarning" or (text.startswith("target ") and " missed" in text):
            continue  # speed notes, and a cost target not reached (the bound held: no accuracy news)
        speed = any(word in text for word in _SPEED_WORDS)
        accuracy = any(word in text for word in _ACCURACY_WORDS)
        if category == "FidelityWarning" and (accuracy or not speed):
            out.append(w)
        elif "accuracy" in category.lower() or (accuracy and "Fidelity" in category):
            out.append(w)
    return out


def _says_not_kept(message: str) -> bool:
    """An accuracy warning that says the result is not the original any more ("accuracy not kept: ...", before
    issue 18 "the factorized model is far from the original: ..."); an overfit note or a missing held-out set
    is a caution, not that verdict."""
    text = message.lower()
    return "not kept" in text or "far from the original" in text


def recheck(out: dict) -> dict:
    """``out`` with its accuracy warnings and criterion derived again from what it recorded (rows of an
    earlier run rendered with the current rules)."""
    if "tolerance" not in out or "warnings" not in out:
        return out
    spec = {"metric_key": out["metric_key"], "tolerance": out["tolerance"],
            "higher_is_better": out.get("higher_is_better", True)}
    out = {**out, "accuracy_warnings": accuracy_warnings(out["warnings"])}
    out["criterion"] = criterion(out, spec)
    return out


def criterion(out: dict, spec: dict) -> dict:
    """Issue 18's criterion: either the task metric is kept within the spec's tolerance on held-out data,
    or the tool said it was not (a failed fidelity check, an accuracy warning, or an error that the
    bound cannot be met). With a bound or a metric given, a returned model must keep the metric."""
    original, after = out.get("metric_original"), out.get("metric")
    key, tol = spec["metric_key"], spec["tolerance"]
    result: dict = {"tolerance": tol, "metric_key": key}
    if out.get("error"):
        said = "tool_error" if out.get("error_kind") == "ConvfactorError" else "crash"
        result.update(kept=None, tool_said_not_kept=said == "tool_error", verdict=said)
        return result
    if not original or after is None:
        return result
    drop = original[key] - after[key] if spec["higher_is_better"] else after[key] - original[key]
    kept = drop <= tol + 1e-12
    check = out.get("fidelity_check") or {}
    said = check.get("passed") is False or any(_says_not_kept(w["message"]) for w in out.get("accuracy_warnings", []))
    bounded = out["row"].startswith(("fidelity_", "metric_"))
    if kept:
        verdict = "kept" + (" (tool said not kept: false alarm)" if said else "")
    elif said:
        verdict = "not kept, tool said so" + (" (bound given: returned a model that misses it)" if bounded else "")
    else:
        verdict = "FALSE PASS: not kept, tool silent"
    result.update(drop=drop, kept=kept, tool_said_not_kept=said, verdict=verdict,
                  ok=kept or (said and not bounded))
    return result


def run_row(model_name: str, row: str, quick: bool, max_rel_error: float = 0.1,
            validation: bool = False) -> dict:
    """Everything measured for one row, as plain data."""
    import warnings

    threads = int(os.environ.get("CONVFACTOR_BENCH_THREADS", "1"))  # 1 unless asked: the CPU is shared
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec = load_spec(model_name, quick)
    model = spec["build"]()
    out = {"model": model_name, "row": row, "torch_threads": threads, "metric_key": spec["metric_key"],
           "metric_desc": spec["metric_desc"], "domain": spec["domain"], "source": spec["source"],
           "params": sum(p.numel() for p in model.parameters()), "notes": []}
    if "tolerance" in spec:
        out.update(tolerance=spec["tolerance"], higher_is_better=spec["higher_is_better"])
    if row == "original":
        out.update(metric=spec["metric"](model), mac_ratio=1.0, speedup=1.0, rel_error=0.0)
        from convfactor.costs import per_layer_macs

        out["macs"] = sum(per_layer_macs(model, spec["example"]).values())
        out["peak_rss_mb"] = _peak_rss_mb()
        return out

    plan = row_plan(row, spec, model, max_rel_error, validation)
    out["policy"] = plan["policy"]
    out["factorize_kwargs"] = sorted(plan["kwargs"])
    if plan.get("note"):
        out["notes"].append(plan["note"])
    missing = missing_api(plan)
    if missing:
        out.update(error=missing, error_kind="api")
        return out
    if "tolerance" in spec:
        out["metric_original"] = spec["metric"](model)
    out["rss_before_mb"] = _peak_rss_mb()
    start, cpu_start = time.perf_counter(), time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fast, note = _factorize(model, plan, spec)
        except ConvfactorError as exc:
            fast = None
            out.update(error=f"{type(exc).__name__}: {exc}", error_kind="ConvfactorError")
    out["warnings"] = [{"category": w.category.__name__, "message": str(w.message)[:600]} for w in caught
                       if not issubclass(w.category, (DeprecationWarning,))
                       and "non-tuple sequence" not in str(w.message)
                       and "NumPy array is not writable" not in str(w.message)]
    out["accuracy_warnings"] = accuracy_warnings(out["warnings"])
    out["factorize_s"] = time.perf_counter() - start
    out["factorize_cpu_s"] = time.process_time() - cpu_start
    out["peak_rss_mb"] = _peak_rss_mb()
    if fast is None:
        if "tolerance" in spec:
            out["criterion"] = criterion(out, spec)
        return out
    if note:
        out["notes"].append(note)
    report = convfactor.get_report(fast)
    out["mac_ratio"] = report.macs_after / report.macs_before if report.macs_before else None
    out["param_ratio"] = report.params_after / report.params_before
    out["report_notes"] = list(report.notes)
    out["report_warnings"] = list(getattr(report, "warnings", []))
    out["fidelity_check"] = report.extra.get("fidelity_check")
    for key in ("metric", "validation", "heldout", "held_out"):
        if key in report.extra:
            out[f"report_{key}"] = report.extra[key]
    out["methods"] = _method_counts(report)
    auto = report.extra.get("auto") or {}
    if auto.get("data_split") is not None:
        out["data_split"] = auto["data_split"]
    out["auto_info"] = {k: v for k, v in auto.items() if isinstance(v, (str, int, float, bool, list))
                        and len(str(v)) < 2000}
    out["metric"] = spec["metric"](fast)
    probe = _batches(spec["calibration"], 16)[0]
    with torch.no_grad():
        ref, got = _leaves(model(*probe)), _leaves(fast(*probe))
        out["rel_error"] = _rel_error(torch.cat([t.flatten() for t in ref]), torch.cat([t.flatten() for t in got]))
    if spec.get("validation") is not None:
        out["in_sample_errors"] = output_errors(model, fast, spec["calibration"], spec)
        out["held_out_errors"] = output_errors(model, fast, spec["validation"], spec)
    if "tolerance" in spec:
        out["criterion"] = criterion(out, spec)
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
        bench = convfactor.runtime.benchmark(model, fast, spec["example"], threads=1, progress=False,
                                     warmup=3, repeats=15, min_time=2.0)
    except Exception as exc:  # an export failure is a finding to report, not a reason to stop
        return {"speedup": None, "speedup_error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    result = bench.results[0]
    return {"speedup": result.speedup, "speedup_p10": result.speedup_p10,
            "speedup_p90": result.speedup_p90, "pairs": result.pairs,
            "original_ms": result.original.median_ms, "factorized_ms": result.factorized.median_ms,
            "exporters": {k: v.get("exporter") for k, v in bench.to_dict().get("models", {}).items()}}


def worker_main(model_name: str, row: str, quick: bool, max_rel_error: float, path: str,
                validation: bool = False) -> int:
    import json

    try:
        result = run_row(model_name, row, quick, max_rel_error, validation)
    except Exception as exc:  # a crash in convfactor is a finding: keep its traceback
        result = {"model": model_name, "row": row, "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()[-4000:]}
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    return 0
