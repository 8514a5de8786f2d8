"""The summary block: one glance at what a conversion bought and whether it is faithful.

Built from the JSON document the CLI writes (the factorize report plus the optional ``onnx``,
``fidelity``, ``bench`` and ``fidelity_bound`` sections), so the text and the JSON say the same thing.
"""

from __future__ import annotations

from typing import Any

from .report import human_count
from .score import challenge_score
from .tables import format_grid
from .target_outcome import render_target

__all__ = ["summarize", "render_summary"]


def summarize(document: dict[str, Any], *, weight_bits: int = 32, activation_bits: int = 32,
              structured_pruning: float = 0.0, unstructured_pruning: float = 0.0) -> dict[str, Any]:
    """The summary of a conversion document (see module docstring); JSON-able."""
    totals = document["factorize"]["totals"]
    summary: dict[str, Any] = {
        "params": [totals["params_before"], totals["params_after"], totals["params_ratio"]],
        "macs": [totals["macs_before"], totals["macs_after"], totals["macs_ratio"]],
        "layers_replaced": [totals["layers_replaced"], totals["layers_total"]],
    }
    if "zeros_after" in totals:  # [zeros before, after, fraction before, after] (older documents lack them)
        summary["zeros"] = [totals["zeros_before"], totals["zeros_after"], totals["zero_fraction_before"],
                            totals["zero_fraction_after"]]
    score_options = {"weight_bits": weight_bits, "activation_bits": activation_bits,
                     "structured_pruning": structured_pruning, "unstructured_pruning": unstructured_pruning}
    quantize = document.get("quantize")
    artifact_bits = quantize["factorized"]["bits"] if quantize and quantize["result"] == "int8" else None
    if totals["macs_before"] is not None:
        before = challenge_score(totals["params_before"], totals["macs_before"], **score_options)
        after_options = score_options if artifact_bits is None else {
            **score_options, "weight_bits": artifact_bits["weight_bits"],
            "activation_bits": artifact_bits["activation_bits"]}
        after = challenge_score(totals["params_after"], totals["macs_after"], **after_options)
        summary["challenge_score"] = [before.score, after.score]
        summary["challenge_score_options"] = score_options
        if artifact_bits is not None:  # the result is the int8 file: its bits are counted, not declared
            summary["challenge_score_after_bits"] = {"weight_bits": artifact_bits["weight_bits"],
                                                     "activation_bits": artifact_bits["activation_bits"],
                                                     "from": quantize["path"]}
    if quantize:
        summary["int8"] = _int8_summary(quantize)
    onnx = document.get("onnx")
    if onnx:
        summary["onnx_file_size"] = onnx["file_size"]
    bench = document.get("bench")
    if bench:
        summary["latency"] = [
            {"threads": r["threads"], "original_ms": r["original"]["median_ms"],
             "factorized_ms": r["factorized"]["median_ms"], "speedup": r["speedup"],
             "speedup_p10": r["speedup_p10"], "speedup_p90": r["speedup_p90"], "reliable": r.get("reliable", True)}
            for r in bench["results"]
        ]
    fidelity = document.get("fidelity")
    if fidelity:
        summary["fidelity"] = fidelity["verdict"]
    bound = document.get("fidelity_bound")
    if bound:  # the policy's fidelity bound as the command line set it: {"bound": {key: value}, "from": {key: where}}
        summary["fidelity_bound"] = bound
    if document.get("target"):  # asked, measured, met or missed (convfactor.target_outcome)
        summary["target"] = document["target"]
    check = document["factorize"].get("extra", {}).get("fidelity_check")
    if check:  # the automatic policy's own check of the result against the original (convfactor.auto.search.verify)
        summary["output_check"] = {k: check.get(k) for k in ("rel_error", "worst", "agreement", "samples", "data",
                                                             "bound_source", "bound_text", "passed", "held_out",
                                                             "in_sample", "overfit", "outputs", "metric",
                                                             "metric_original", "metric_name")}
    distilled = document["factorize"].get("extra", {}).get("distill")
    if distilled:  # factorize(..., distill=...): before and after on the check part (convfactor.distill.result)
        from .distill.result import distill_summary

        summary["distill"] = distill_summary(distilled)
    return summary


def render_summary(summary: dict[str, Any]) -> str:
    """Fixed-width text of ``summarize``'s result: a label and a value per line."""
    p0, p1, pr = summary["params"]
    rows = [["layers replaced", f"{summary['layers_replaced'][0]}/{summary['layers_replaced'][1]}"],
            ["params", f"{human_count(p0)} -> {human_count(p1)}  (x{pr:.3f})"]]
    if "zeros" in summary:
        z0, z1, f0, f1 = summary["zeros"]
        rows.append(["zeros (p_u)", f"{f0:.3f} -> {f1:.3f}  ({human_count(z0)} -> {human_count(z1)} parameters "
                                    f"exactly zero, measured)"])
    m0, m1, mr = summary["macs"]
    if m0 is not None:
        rows.append(["MACs/sample", f"{human_count(m0)} -> {human_count(m1)}  (x{mr:.3f})"])
    if "challenge_score" in summary:
        s0, s1 = summary["challenge_score"]
        bits = summary["challenge_score_options"]
        uncounted = ("zeros" in summary and summary["zeros"][3] > 0 and bits["unstructured_pruning"] == 0
                     and bits["structured_pruning"] == 0)
        hint = (f"; zeros not counted: --unstructured-pruning {summary['zeros'][3]:.3f} counts them"
                if uncounted else "")
        counted = summary.get("challenge_score_after_bits")
        after_bits = "" if counted is None else (
            f"; after: {counted['weight_bits']:g}-bit weights, {counted['activation_bits']}-bit activations "
            f"read from {counted['from']}")
        rows.append(["challenge score", f"{s0:.4f} -> {s1:.4f}  ({bits['weight_bits']}-bit weights, "
                                        f"{bits['activation_bits']}-bit activations{after_bits}; lower is "
                                        f"better{hint})"])
    if "onnx_file_size" in summary:
        rows.append(["ONNX file", f"{summary['onnx_file_size'] / 1e6:.2f} MB"])
    for lat in summary.get("latency", []):
        head = f"{lat['original_ms']:.3f} ms -> {lat['factorized_ms']:.3f} ms"
        if not lat.get("reliable", True):  # a spread that wide says nothing: no figure, no verdict
            rows.append([f"latency {lat['threads']} thr", f"{head}  speedup not reliable: per-pair ratios "
                         f"{lat['speedup_p10']:.2f}-{lat['speedup_p90']:.2f}x (machine too noisy; rerun with a "
                         f"longer --min-time)"])
            continue
        verdict = "faster" if lat["speedup"] > 1 else "SLOWER"
        rows.append([f"latency {lat['threads']} thr",
                     f"{head}  speedup {lat['speedup']:.2f}x ({verdict}, onnxruntime, measured)"])
    if "target" in summary:
        rows.append(["target", render_target(summary["target"])])
    if "fidelity" in summary:
        rows.append(["fidelity", summary["fidelity"]])
    rows += _int8_rows(summary.get("int8"))
    if "fidelity_bound" in summary:
        bound = summary["fidelity_bound"]
        rows.append(["fidelity bound", ", ".join(f"{k} {v:g} ({bound['from'][k]})" for k, v in bound["bound"].items())])
    if "output_check" in summary:
        c = summary["output_check"]
        verdict = "accuracy kept" if c["passed"] else "accuracy NOT kept"
        bound = f": {c['bound_text']}" if c.get("bound_text") else ""
        within = "within" if c["passed"] else "OUTSIDE"
        rows.append(["fidelity check", f"{verdict} ({within} the {c['bound_source']}{bound}; "
                                       f"{'held-out' if c.get('held_out') else 'NOT held-out'} data)"])
        where = f" ({c['worst']})" if c.get("worst") else ""
        agreement = "" if c["agreement"] is None else f", top-1 agreement {c['agreement']:.3f}"
        rows.append(["output error", f"{c['rel_error']:.4g} worst-slice relative{where}{agreement} on {c['samples']} "
                                     f"{c['data']}"])
        if c.get("in_sample"):
            overfit = f"; held-out is {c['overfit']:.1f}x: the fit overfits" if c.get("overfit") else ""
            rows.append(["in-sample error", f"{c['in_sample']['rel_error']:.4g} on {c['in_sample']['samples']} fit "
                                            f"samples{overfit}"])
        if c.get("metric") is not None:
            rows.append([c.get("metric_name") or "metric", f"{c['metric_original']:.4g} -> {c['metric']:.4g} "
                                                           f"(original -> result, held-out: your data)"])
        for row in c.get("outputs") or []:
            if len(c["outputs"]) > 1 or row["slices"] > 1:
                extra = f", agreement {row['agreement']:.3f}" if "agreement" in row else ""
                rows.append([f"  output {row['name']}", f"{row['rel_error']:.4g} ({row['kind']}); worst of "
                             f"{row['slices']} slice(s) [{row['worst_slice']}] {row['worst_slice_error']:.4g}{extra}"])
    if "distill" in summary:
        from .distill.result import distill_rows

        rows.extend(distill_rows(summary["distill"]))
    return "\n".join(["summary"] + ["  " + line for line in format_grid(None, rows, free_last=True)])


_INT8_ROLES = ("original_int8", "factorized", "factorized_int8")


def _int8_summary(section: dict[str, Any]) -> dict[str, Any]:
    """The quantization in a glance: which file is the result, and the four models' verdicts and latencies."""
    out: dict[str, Any] = {"result": section["result"], "path": section["path"],
                           "mode": section["factorized"]["mode"], "warnings": list(section.get("warnings", []))}
    if section.get("fidelity"):
        out["fidelity"] = {role: section["fidelity"][role]["verdict"] for role in _INT8_ROLES}
    if section.get("latency"):
        out["latency"] = [{"threads": t["threads"],
                           **{role: {"median_ms": m["median_ms"], "speedup": m["speedup"], "reliable": m["reliable"]}
                              for role, m in t["models"].items()}} for t in section["latency"]]
    return out


def _int8_rows(int8: dict[str, Any] | None) -> list[list[str]]:
    """The summary's int8 lines: the result, then per thread count the four models' latencies."""
    if not int8:
        return []
    result = (f"{int8['path']} ({int8['mode']} quantization)" if int8["result"] == "int8"
              else "float kept: the int8 model broke the fidelity bound")
    rows = [["int8 result", result]]
    if "fidelity" in int8:
        rows.append(["int8 fidelity", ", ".join(f"{role.replace('_', ' ')} {verdict}"
                                                for role, verdict in int8["fidelity"].items())])
    for lat in int8.get("latency", []):
        cells = [f"original {lat['original']['median_ms']:.3f} ms"]
        for role in _INT8_ROLES:
            model = lat[role]
            ratio = f"{model['speedup']:.2f}x" if model["reliable"] else "noisy"
            cells.append(f"{role.replace('_', ' ')} {model['median_ms']:.3f} ms ({ratio})")
        rows.append([f"4 models {lat['threads']} thr", ", ".join(cells)])
    return rows
