"""What runs in onnxruntime: export to ONNX, sessions, and the measurements made with them.

    export, exporters, onnx_graph    a module -> one checked .onnx file (dynamo, else TorchScript)
    sessions                         an .onnx file (or a module, exported) -> a session and its feeds
    fidelity, fidelity_report        original vs factorized outputs, each against a tolerance
    benchmarking, shared_timing      interleaved A/B timing; several models timed together
    profiling, node_scopes           per-layer time, each onnxruntime node charged to its module
    quantize, quantized_graph        int8 (QDQ) ONNX from a float model or file

The measurement functions and their reports are importable from here (``convfactor.runtime.benchmark``);
each loads its module on first use, so exporting a model does not import onnxruntime's quantization.
"""

from ..lazy_exports import lazy_getattr

_LAZY = {
    "check_fidelity": "fidelity",
    "FidelityReport": "fidelity_report",
    "benchmark": "benchmarking",
    "BenchmarkReport": "benchmarking",
    "quantize_onnx": "quantize",
    "QuantizeResult": "quantize",
    "profile_layers": "profiling",
    "profile_model": "profiling",
    "LayerProfileReport": "profiling",
}

__all__ = [*_LAZY]

__getattr__ = lazy_getattr(__name__, globals(), _LAZY)
