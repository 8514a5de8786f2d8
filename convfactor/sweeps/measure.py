"""How a sweep measures each point: held-out fidelity as ``factorize`` reports it, speed as ``bench`` times it.

Every point, convfactor's and the baseline's, is measured on the same samples: the check part of the data
split ``factorize`` uses (``convfactor.auto.statistics.split``: with calibration only, sample i % 8 == 7; with
validation, its odd samples), which no fit, refit or selection of any point saw. The measurement is
``held_out_check``'s (per output and slice, the bound: the policy's, else the default floor; the task metric
when given), so a point reads as ``convert`` would report it. A convfactor point's ``factorize`` has measured
exactly that already (its ``report.extra['fidelity_check']``: the same samples, bound and metric), so its
record is taken as it is rather than measured (and the task metric evaluated) a second time; the baseline's
points, which no ``factorize`` checked, are measured here. The speedup is ``benchmark``'s: the original
(exported once) and the point's model timed interleaved in onnxruntime.

With int8 points, a model's float ONNX file (the one its speed is timed from) is quantized by
``quantize_onnx``, calibrated on the split's fit and select samples (never the check samples; none with
neither: dynamic quantization), and the int8 file is measured through ``OnnxModule`` on the same check
samples and timed against the same float original.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from ..auto.options import AutoOptions
from ..auto.search.verify import applied_bound, held_out_check
from ..auto.statistics.split import first_samples, split_data
from ..batches import calibration_batches
from ..fidelity_spec import Fidelity
from ..metric import Metric
from ..output_checker import OutputChecker
from ..runtime.benchmarking import benchmark
from ..runtime.export import export_onnx
from ..runtime.onnx_module import OnnxModule
from ..runtime.quantize import quantize_onnx

__all__ = ["PointMeter"]


class PointMeter:
    """Measures models against ``original`` on the held-out check samples and in onnxruntime.

    Args:
        original: the caller's model (eval mode; not modified).
        inputs: the example input tuple (the timed batch's shape).
        calibration, validation: as given to the sweep (the split is ``factorize``'s).
        metric: the task metric, or None.
        spec, bound: the policy's fidelity declarations and bound (None: the default floor).
        opts: the ``AutoOptions`` (sample limits).
        bench: ``benchmark`` keyword arguments (threads, warmup, repeats, min_time, exporter), or None: not timed.

    ``metric_original``: the original's task metric when already evaluated (set before the first measurement;
    None: the meter evaluates it once).
    """

    def __init__(self, original: nn.Module, inputs: tuple, calibration: Any, validation: Any, metric: Metric | None,
                 spec: Fidelity | None, bound: Fidelity | None, opts: AutoOptions, bench: dict[str, Any] | None):
        batches = calibration_batches(calibration, len(inputs), opts.max_samples, like=inputs) \
            if calibration is not None else None
        held = calibration_batches(validation, len(inputs), opts.max_samples, like=inputs) \
            if validation is not None else None
        split = split_data(batches, held, inputs)
        self.split = split.describe()
        self._check = (first_samples(split.check, opts.fidelity_samples), split.check_label)
        self.metric, self.metric_original = metric, None
        self._checker: OutputChecker | None = None
        self.spec, self.bound, self.inputs, self.bench = spec, bound, inputs, bench
        self.original = original
        held_out = split.source == "calibration" and split.held_out
        self.int8_calibration = ((split.fit or []) + ((split.select or []) if held_out else [])) or None
        self._dir = tempfile.TemporaryDirectory(prefix="convfactor-sweep-")
        self._original_onnx: Path | None = None
        self._files = 0

    @property
    def checker(self) -> OutputChecker:
        """The check samples' ``OutputChecker``, made at first use: the original's metric is evaluated then,
        unless ``metric_original`` was set (the value the sweep's points were measured against)."""
        if self._checker is None:
            batches, label = self._check
            self._checker = OutputChecker(self.original, batches, label, spec=self.spec, metric=self.metric,
                                          metric_limit=0, metric_original=self.metric_original)
        return self._checker

    @property
    def data(self) -> str:
        return f"{self.checker.samples} {self.checker.data}"

    def fidelity(self, model: nn.Module, measured: dict[str, Any] | None = None) -> dict[str, Any]:
        """``held_out_check``'s record of ``model`` on the check samples (``passed``: within the bound):
        ``measured`` (the record ``factorize`` reported for ``model``) when it is this measurement, else measured."""
        if self.same_check(measured):
            return measured
        record, _ = held_out_check({"check": self.checker}, model, self.bound, self.spec, self.split)
        assert record is not None
        return record

    def same_check(self, record: dict[str, Any] | None) -> bool:
        """Whether ``record`` was measured on this meter's samples, under its bound, with its metric."""
        return record is not None and record.get("samples") == self.checker.samples and \
            record.get("data") == self.checker.data and \
            record.get("held_out") == bool(self.split.get("held_out")) and \
            record.get("bound") == applied_bound(self.bound, self.spec).to_dict() and \
            ("metric" in record) == (self.checker.metric is not None) and \
            record.get("metric_name") == (self.checker.metric.name if self.checker.metric is not None else None)

    def export(self, model: nn.Module) -> Path:
        """``model``'s float ONNX file in the sweep's scratch directory (the exporter ``bench`` names)."""
        self._files += 1
        path = Path(self._dir.name) / f"point{self._files}.onnx"
        export_onnx(model, self.inputs, path, exporter=(self.bench or {}).get("exporter", "auto"))
        return path

    def original_onnx(self) -> Path:
        """The original's float ONNX file, exported once."""
        if self._original_onnx is None:
            self._original_onnx = self.export(self.original)
        return self._original_onnx

    def speed(self, model: nn.Module | Path, name: str) -> dict[str, Any] | None:
        """``benchmark`` of the float original against ``model`` (a module or an ONNX file) at the sweep's one
        thread count (None: not timed)."""
        if self.bench is None:
            return None
        report = benchmark(self.original_onnx(), model, self.inputs, progress=False, workdir=self._dir.name,
                           **self.bench)
        return report.results[0].to_dict()

    def quantize(self, onnx_path: Path, label: str, options: dict[str, Any]) -> tuple[OnnxModule, dict[str, Any]]:
        """The int8 form of a float ONNX file (``quantize_onnx``), as a module, and how it was quantized."""
        target = onnx_path.with_name(f"{onnx_path.stem}.int8.onnx")
        result = quantize_onnx(onnx_path, target, self.int8_calibration, force=True, **options)
        return OnnxModule(result.path, name=label), {**result.to_dict(), "path": target}

    def close(self) -> None:
        self._dir.cleanup()

