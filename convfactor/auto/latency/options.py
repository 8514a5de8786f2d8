"""Options of the latency model: the ``latency=`` mapping of ``factorize``, validated."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from ...errors import ConvfactorError

__all__ = ["LatencyOptions", "RUNTIMES", "DEVICES"]

RUNTIMES = ("onnxruntime", "torch")
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class LatencyOptions:
    """Options of the latency model (the ``latency=`` mapping of ``factorize``).

    Attributes:
        runtime: what the times are measured in: "onnxruntime" (CPU) or "torch" (PyTorch eager).
        device: "cpu", or "cuda" (runtime "torch" only; needs ``torch.cuda.is_available()``).
        threads: onnxruntime intra-op threads, or ``torch.set_num_threads`` for torch on CPU.
        cache: the JSON cache file; None: ``default_cache_path()``; False: no cache.
        graph_optimization: onnxruntime level ("disabled", "basic", "extended", "all").
        warmup: untimed runs of each variant before timing.
        repeats: timed rounds per layer (each round runs every variant once).
        max_seconds_per_layer: stop timing a layer's variants after this long (at least 3 rounds).
        max_candidates: per layer and method, at most this many ranks are timed (spread over the grid).
        verify: time the whole factorized model against the original and fall back when it is not faster.
        verify_min_time: seconds of interleaved pairs per whole-model comparison.
        verify_rounds: whole-model comparisons allowed while dropping layers.
        exporter: torch exporter tried first for whole models ("torchscript" is fast; "dynamo"; "auto" means
            dynamo); the other one is tried when it fails. onnxruntime only.
        context: onnxruntime times each layer between two cheap channel-blocked neighbours, as inside a
            network (``ort_timing.layer_onnx``), so the layout reorders a form causes are counted.
        int8: onnxruntime times every layer graph and whole model after ``quantize_onnx`` (static QDQ
            int8, ``auto.int8_timing``): ranks chosen for the int8 kernels of a model deployed with
            ``--quantize int8``. Cached apart from float times.
    """

    runtime: str = "onnxruntime"
    device: str = "cpu"
    threads: int = 1
    cache: str | os.PathLike | bool | None = None
    graph_optimization: str = "all"
    warmup: int = 3
    repeats: int = 25
    max_seconds_per_layer: float = 2.0
    max_candidates: int = 8
    verify: bool = True
    verify_min_time: float = 1.0
    verify_rounds: int = 5
    exporter: str = "torchscript"
    context: bool = True
    int8: bool = False

    @classmethod
    def from_any(cls, spec: LatencyOptions | Mapping[str, Any] | None) -> LatencyOptions:
        """Options from None, a LatencyOptions, or a mapping of its field names.

        Raises:
            ConvfactorError: an unknown key or a bad value.
        """
        if spec is None:
            return cls()
        if isinstance(spec, LatencyOptions):
            return spec
        if not isinstance(spec, Mapping):
            raise ConvfactorError(f"latency options must be a mapping, got {type(spec).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = [k for k in spec if k not in known]
        if unknown:
            raise ConvfactorError(f"latency: unknown option {unknown[0]!r} (known: {', '.join(sorted(known))})")
        options = cls(**spec)
        for name in ("threads", "repeats", "max_candidates", "verify_rounds"):
            value = getattr(options, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConvfactorError(f"latency: {name} must be a positive int, got {value!r}")
        if options.runtime not in RUNTIMES:
            raise ConvfactorError(f"latency: unknown runtime {options.runtime!r} (known: {', '.join(RUNTIMES)})")
        from ...runtime.exporters import EXPORTERS

        if options.exporter not in EXPORTERS:
            raise ConvfactorError(f"latency: unknown exporter {options.exporter!r} (known: {', '.join(EXPORTERS)})")
        if options.int8 and options.runtime != "onnxruntime":
            raise ConvfactorError(f"latency: int8 timing needs runtime 'onnxruntime' (got {options.runtime!r})")
        if options.device not in DEVICES:
            raise ConvfactorError(f"latency: unknown device {options.device!r} (known: {', '.join(DEVICES)})")
        if options.device == "cuda":
            if options.runtime != "torch":
                raise ConvfactorError(f"latency: device 'cuda' needs runtime 'torch' (got {options.runtime!r})")
            if not torch.cuda.is_available():
                raise ConvfactorError("latency: device 'cuda' was asked for but torch.cuda.is_available() is False")
        return options
