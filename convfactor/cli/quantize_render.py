"""The text of ``convert --quantize``'s section: what was quantized, and the four models side by side.

Read from the JSON section ``quantize_step.run_quantize`` returns, so the text and the report agree.
"""

from __future__ import annotations

from typing import Any

from ..tables import format_grid

__all__ = ["render_quantize", "describe_quantization"]

LABELS = {"original": "original", "original_int8": "original int8", "factorized": "factorized",
          "factorized_int8": "factorized int8"}


def describe_quantization(result: dict[str, Any]) -> str:
    """One line: how the model was quantized and what the graph holds now."""
    how = (f"static {result['format']}, {result['calibrate_method']} ranges on {result['calibration_samples']} "
           f"calibration samples" if result["mode"] == "static"
           else "dynamic (no --calibration: activation ranges computed at run time)")
    skip = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
    ops = " + ".join(f"{n} {op}" for op, n in result["quantized_nodes"].items() if op not in skip) or "nothing"
    floats = sum(result["float_compute_nodes"].values())
    bits = result["bits"]
    return (f"{how}; {ops} quantized, {floats} compute node(s) float; weights {bits['weight_bits']:g} bits, "
            f"activations {bits['activation_bits']} bits (read from the graph); "
            f"{result['float_file_size'] / 1e6:.2f} -> {result['file_size'] / 1e6:.2f} MB")


def _worst_rel_l2(report: dict[str, Any]) -> float | None:
    """The largest relative L2 error over outputs (of the worst slice where the report has slices)."""
    values = [o.get("metrics", {}).get("worst_slice_rel_error", o.get("metrics", {}).get("rel_l2_error"))
              for o in report.get("outputs", [])]
    values = [v for v in values if isinstance(v, (int, float))]
    return max(values) if values else None


def render_quantize(section: dict[str, Any]) -> str:
    """The quantization block of the text output."""
    lines = []
    if section["result"] == "int8":
        lines.append(f"wrote {section['path']}: {describe_quantization(section['factorized'])}")
    else:
        lines.append(f"int8 not kept (the float model is the result): {describe_quantization(section['factorized'])}")
    check = section.get("bound_check")
    if check:
        verdict = "within" if check["passed"] else "OUTSIDE"
        lines.append(f"int8 against the fidelity bound on {check['data']}: {verdict}"
                     + ("" if check["passed"] else f" ({check['failed']})"))
    fidelity, latency = section.get("fidelity"), section.get("latency")
    if fidelity or latency:
        header = ["model"]
        if fidelity:
            header += ["fidelity vs original", "rel. L2"]
        for timing in latency or []:
            header += [f"{timing['threads']} thr ms", "speedup"]
        rows = []
        for role, label in LABELS.items():
            row = [label]
            if fidelity:
                entry = fidelity.get(role)
                rel = None if entry is None else _worst_rel_l2(entry["report"])
                row += ["reference" if entry is None else entry["verdict"], "" if rel is None else f"{rel:.4f}"]
            for timing in latency or []:
                model = timing["models"][role]
                shown = f"{model['speedup']:.2f}x" if model["reliable"] else "noisy"
                row += [f"{model['median_ms']:.3f}", shown]
            rows.append(row)
        lines.append("four models (fidelity on the --check inputs; latency timed together in rotating rounds, "
                     "speedup = original median / model median)")
        lines += format_grid(header, rows, left=1)
    lines += section.get("warnings", [])
    return "\n".join(lines)
