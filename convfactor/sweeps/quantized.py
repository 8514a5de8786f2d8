"""A sweep's int8 points: each convfactor point (and the original, once) quantized and measured like the others.

    point's model -> its float ONNX (the file the float point was timed from)
                  -> ``quantize_onnx`` (what ``convert --quantize int8`` runs: static QDQ, per-channel int8
                     weights, calibrated on the split's fit and select samples; dynamic without data)
                  -> ``OnnxModule`` (the int8 file run by onnxruntime behind a module's call)
                  -> the held-out check and the task metric on the check samples every point is measured on,
                     and ``benchmark`` against the *float* original (interleaved, as every point)

The int8 point's label is its float point's plus `` int8`` (``macs=0.5 int8``; the original's is ``original
int8``); MACs and parameter fractions are its float model's (quantizing changes the bits, not the counts).
Activation ranges are computed on calibration samples the check never measures on, so the int8 numbers are
held out as the float ones are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..errors import ConvfactorError
from ..runtime.quantize import CALIBRATE_METHODS, QUANTIZE_TYPES
from .result import SweepPoint, measured_fields

__all__ = ["QUANTIZE_KEYS", "INT8_SUFFIX", "int8_label", "float_label", "int8_options", "describe",
           "int8_point", "original_point"]

QUANTIZE_KEYS = ("calibrate_method", "keep_float")
INT8_SUFFIX = " int8"


def int8_label(label: str) -> str:
    """An int8 point's label: its float point's plus `` int8`` (``macs=0.5 int8``; ``original int8``)."""
    return label + INT8_SUFFIX


def float_label(point: SweepPoint) -> str:
    """The label of the float point ``point`` was quantized from (``int8_label``'s inverse); a float point's own."""
    return point.label.removesuffix(INT8_SUFFIX) if point.quantized else point.label


def int8_options(quantize: str | None, options: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``quantize_onnx`` keywords for ``sweep(quantize=..., quantize_options=...)``, checked before any work
    (None: no int8 points). The defaults are ``convert --quantize int8``'s.

    Raises:
        ConvfactorError: an unknown type or option, or options without ``quantize``.
    """
    if quantize is None:
        if options:
            raise ConvfactorError(f"sweep: quantize_options ({', '.join(sorted(options))}) are only used with "
                                  "quantize='int8'")
        return None
    if quantize not in QUANTIZE_TYPES:
        raise ConvfactorError(f"sweep: quantize={quantize!r}; choose {', '.join(QUANTIZE_TYPES)} or None")
    given = dict(options or {})
    unknown = sorted(set(given) - set(QUANTIZE_KEYS))
    if unknown:
        raise ConvfactorError(f"sweep: unknown quantize option(s) {', '.join(unknown)} (known: "
                              f"{', '.join(QUANTIZE_KEYS)})")
    method = given.get("calibrate_method") or "minmax"
    if method not in CALIBRATE_METHODS:
        raise ConvfactorError(f"sweep: calibrate_method {method!r}; choose {', '.join(CALIBRATE_METHODS)}")
    keep = given.get("keep_float") or ()
    keep = [keep] if isinstance(keep, str) else list(keep)
    return {"per_channel": True, "calibrate_method": method, "keep_float": keep}


def describe(options: dict[str, Any], calibration: list | None, data: str) -> dict[str, Any]:
    """The JSON record of how the int8 points were made (``SweepResult.quantize``), with a one-line ``text``."""
    samples = 0 if calibration is None else int(sum(len(batch[0]) for batch in calibration))
    how = (f"static QDQ, {options['calibrate_method']} ranges on {samples} calibration samples (the fit and select "
           f"parts; not the {data} measured)" if samples else
           "dynamic (no calibration data: activation ranges computed at run time)")
    kept = f"; kept in float: {', '.join(options['keep_float'])}" if options["keep_float"] else ""
    return {"type": "int8", **options, "calibration_samples": samples,
            "text": f"onnxruntime int8, per-channel weights, {how}{kept}"}


def int8_point(float_point: SweepPoint, record: dict[str, Any], speed: dict[str, Any] | None,
               quantized: dict[str, Any]) -> SweepPoint:
    """The int8 form of ``float_point``: its held-out ``record``, its ``speed`` against the float original and
    how it was quantized (``QuantizeResult.to_dict`` without the temporary path)."""
    return dataclasses.replace(
        float_point, label=int8_label(float_point.label), **measured_fields(record, speed),
        seconds=round(float_point.seconds + quantized["seconds"], 2), quantized="int8",
        quantize={k: v for k, v in quantized.items() if k != "path"})


def original_point(seconds: float) -> SweepPoint:
    """The float original as the record ``int8_point`` turns into ``original int8`` (nothing factorized)."""
    return SweepPoint(label="original", kind="original", fraction=1.0, baseline=False, macs_fraction=1.0,
                      params_fraction=1.0, rel_error=0.0, worst=None, outputs=[], within_bound=True,
                      seconds=round(seconds, 2))

